"""`mistral-jax export --adapter RUN DST`: an sft LoRA run as a Hugging Face PEFT directory that peft loads onto the
base with our logits (live where peft is installed; otherwise its layout checked against peft's own, the golden
adapter's); the run itself as `adapter=`; runs for another base refused."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import mistral_jax as mj
from mistral_jax import cli
from mistral_jax.checkpoints import peft, run_dir

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "peft" / "smollm2_lora"  # saved by peft itself


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("exports") / "adapter"
    assert cli.main(["export", "--adapter", str(lora_run), str(dst)]) == 0
    return dst


def _pattern(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", name)


def test_export_has_peft_layout(exported, lora_run, llama_dir):
    """Names, shapes and config as peft's own save_pretrained writes them (the golden adapter's)."""
    ours, golden = load_file(exported / peft.WEIGHTS_FILE), load_file(GOLDEN / peft.WEIGHTS_FILE)
    assert {_pattern(k) for k in ours} <= {_pattern(k) for k in golden}
    assert {_pattern(k).split(".layers.N.")[1] for k in ours} == {
        f"{m}.lora_{p}.weight" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for p in "AB"}
    config, _ = mj.load(llama_dir)
    assert len(ours) == 2 * 3 * config.n_layers
    assert ours["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, config.dim)  # [r, in]
    assert ours["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (
        config.n_kv_heads * config.resolved_head_dim, 4)  # [out, r]
    assert ours["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, config.hidden_dim)
    settings = json.loads((exported / peft.CONFIG_FILE).read_text())
    golden_settings = json.loads((GOLDEN / peft.CONFIG_FILE).read_text())
    assert set(settings) <= set(golden_settings)
    assert {k: settings[k] for k in ("peft_type", "task_type", "bias")} == {
        k: golden_settings[k] for k in ("peft_type", "task_type", "bias")}
    assert (settings["r"], settings["lora_alpha"], settings["use_rslora"]) == (4, 8, False)
    assert sorted(settings["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert settings["base_model_name_or_path"] == run_dir.run_info(lora_run)["checkpoint"] == str(llama_dir)


def test_export_and_the_run_as_adapter_equal_the_merged_run(exported, lora_run, llama_dir):
    """The exported PEFT directory and the run directory itself, as `adapter=` on the base, give the run's merged
    weights (mj.load(RUN)), and generate with either gives the merged model's tokens."""
    _, merged = mj.load(lora_run)
    _, base = mj.load(llama_dir)
    assert not np.allclose(merged["layers"]["attention"]["wq"], base["layers"]["attention"]["wq"])
    for adapter in (exported, lora_run):
        _, params = mj.load(llama_dir, adapter=adapter)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), params, merged)
    config, unscanned = mj.load(llama_dir, scan_layers=False)
    _, merged_unscanned = mj.load(lora_run, scan_layers=False)
    prompts = [[5, 6, 7, 8]]
    expected = mj.generate(config, merged_unscanned, prompts, 8)
    assert mj.generate(config, unscanned, prompts, 8, adapter=lora_run) == expected
    assert mj.generate(config, unscanned, prompts, 8, adapter=exported) == expected


@pytest.mark.slow
def test_peft_loads_the_export_with_our_logits(exported, lora_run, llama_dir, tmp_path):
    """Live, where torch, transformers and peft are installed: PeftModel.from_pretrained on the base exported to
    Hugging Face gives the logits of our merged run, and of transformers on the run exported merged."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    assert cli.main(["export", str(llama_dir), str(tmp_path / "base")]) == 0
    assert cli.main(["export", str(lora_run), str(tmp_path / "merged")]) == 0
    tokens = np.array([[5, 6, 7, 8, 40, 41, 42, 43, 9, 10]])
    config, merged = mj.load(lora_run)
    ours = np.asarray(mj.logits(config, merged, tokens))

    def hf_logits(model):
        with torch.no_grad():
            return model.eval()(torch.from_numpy(tokens).long()).logits.float().numpy()

    load = transformers.AutoModelForCausalLM.from_pretrained
    with_adapter = hf_logits(peft_lib.PeftModel.from_pretrained(load(tmp_path / "base", attn_implementation="eager"),
                                                                exported))
    scale = np.max(np.abs(ours))
    assert np.max(np.abs(with_adapter - ours)) <= 1e-4 * scale
    assert np.max(np.abs(hf_logits(load(tmp_path / "merged", attn_implementation="eager")) - ours)) <= 1e-4 * scale
    assert np.max(np.abs(hf_logits(load(tmp_path / "base", attn_implementation="eager")) - ours)) > 1e-2 * scale


def test_export_adapter_refusals(lora_run, tmp_path, capsys):
    def refused(*argv) -> str:
        assert cli.main(["export", "--adapter", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    full = tmp_path / "full"
    info = run_dir.run_info(lora_run)
    run_dir.write_run_info(full, {**info, "lora": None})
    assert "full fine-tune" in refused(full, tmp_path / "a")
    assert "not an sft run directory" in refused(tmp_path, tmp_path / "b")
    assert "already exists" in refused(lora_run, full)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_for_another_base_is_refused(lora_run):
    """The run's tiny-llama adapters onto a base of another shape: one line naming the weight and both shapes."""
    other = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama_mha"
    with pytest.raises(mj.UserError) as err:
        mj.load(other, adapter=lora_run)
    message = str(err.value)
    assert "\n" not in message and "an sft LoRA run on" in message and "this base's" in message
