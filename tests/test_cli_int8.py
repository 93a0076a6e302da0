"""`--quantize int8` and `--kv-cache-dtype int8` on the command line: generate, convert, export, bad input."""

import pathlib

import mistral_jax as mj
from mistral_jax import cli

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "mistral_gqa_window"
PROMPT, NEW = [92, 120, 112, 65], 40  # float, int8 weights, int8 cache and both make four different greedy answers
IDS = ",".join(map(str, PROMPT))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantized_generate_convert_and_the_refusals(capsys, tmp_path):
    float_config, float_params = mj.load(FIXTURE, scan_layers=False)
    config, params = mj.quantize(*mj.load(FIXTURE, scan_layers=False))
    answers = {(weights, cache): mj.generate(c.replace(kv_cache_dtype=cache), p, [PROMPT], NEW, eos_id=c.eos_id)[0]
               for weights, (c, p) in (("float", (float_config, float_params)), ("int8", (config, params)))
               for cache in (None, "int8")}
    assert len({tuple(a) for a in answers.values()}) == 4  # so an ignored flag shows in the ids
    want = answers["int8", "int8"]
    code, out, _ = run(capsys, "generate", "--checkpoint", str(FIXTURE), "--prompt-ids", IDS, "--max-new-tokens",
                       str(NEW), "--quantize", "int8", "--kv-cache-dtype", "int8")
    assert code == 0 and out.splitlines()[-1] == ",".join(map(str, want))

    int8 = tmp_path / "int8"
    assert run(capsys, "convert", str(FIXTURE), str(int8), "--quantize", "int8")[0] == 0
    assert mj.load(int8)[0].quant == "int8"  # restored as it is, without --quantize
    code, out, _ = run(capsys, "generate", "--checkpoint", str(int8), "--prompt-ids", IDS, "--max-new-tokens",
                       str(NEW), "--kv-cache-dtype", "int8")
    assert code == 0 and out.splitlines()[-1] == ",".join(map(str, want))

    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    refusals = [
        (("export", str(int8), str(tmp_path / "hf")), "is a quantized (int8) checkpoint: export writes float"),
        (("sft", "--checkpoint", str(int8), "--data", str(data), "--output", str(tmp_path / "run"), "--steps", "1"),
         "is a quantized (int8) checkpoint: sft trains float weights"),
        (("convert", str(int8), str(tmp_path / "again"), "--quantize", "int8"), "already quantized"),
        (("generate", "--checkpoint", str(FIXTURE), "--prompt-ids", IDS, "--quantize", "fp8"),
         "unknown quantize mode 'fp8'"),
        (("generate", "--checkpoint", str(FIXTURE), "--prompt-ids", IDS, "--kv-cache-dtype", "int4"),
         "kv_cache_dtype must be None or one of"),
    ]
    for argv, message in refusals:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not any((tmp_path / name).exists() for name in ("hf", "again", "run"))
