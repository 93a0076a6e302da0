"""Export of today's families (Mistral v0.3 head_dim, Ministral layer_types, Llama 3 rope + tied, Mixtral 8x22B
heads) to Hugging Face directories: the same tensors and config fields, read back with the same logits by us
and, where it is installed, by transformers."""

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import mistral_jax as mj
from mistral_jax.checkpoints import hf
from mistral_jax.model.transformer import forward

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
CASES = ["mistral_v03_head_dim", "ministral_layer_types", "llama3_rope_tied", "mixtral_8x22b_heads"]
# config.json fields transformers builds these models from (beyond the sizes every config has)
FIELDS = ("model_type", "architectures", "head_dim", "sliding_window", "layer_types", "tie_word_embeddings",
          "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


def logits_of(config, params, reference):
    return np.asarray(jax.jit(forward, static_argnums=0)(config, params, reference["tokens"],
                                                         reference["positions"]).logits)


def close(ours, expected):
    return np.max(np.abs(ours - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    case = request.param
    config, params = mj.load(FIXTURES / case)
    out = hf.write(config, params, tmp_path_factory.mktemp(case) / "export")
    return case, out


def test_export_keeps_tensors_and_config_fields(exported):
    case, out = exported
    source, written = (json.loads((d / "config.json").read_text()) for d in (FIXTURES / case, out))
    for field in FIELDS:
        assert written.get(field) == source.get(field), field
    rope = source["rope_parameters"]
    if rope["rope_type"] == "default":
        assert written["rope_theta"] == rope["rope_theta"] and "rope_parameters" not in written
    else:
        assert written["rope_parameters"] == rope
    theirs, ours = load_file(FIXTURES / case / "model.safetensors"), load_file(out / "model.safetensors")
    if case.startswith("mixtral"):  # transformers 5 saves the fused expert layout; we write the classic one
        theirs = {k: v for k, v in theirs.items() if ".experts." not in k}
        ours = {k: v for k, v in ours.items() if ".experts." not in k}
    assert sorted(theirs) == sorted(ours)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    config, params = mj.load(out)
    assert config == mj.load(FIXTURES / case)[0]
    reference = np.load(FIXTURES / case / "reference.npz")
    assert close(logits_of(config, params, reference), reference["logits"])


def test_transformers_reads_the_export_with_equal_logits(exported):
    """The live twin: transformers itself loads what we wrote (eager attention, float32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    case, out = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    reference = np.load(FIXTURES / case / "reference.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(reference["tokens"]).long(),
                       position_ids=torch.from_numpy(reference["positions"]).long()).logits.float().numpy()
    assert close(logits, reference["logits"])
