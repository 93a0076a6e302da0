"""`mistral-jax serve` under load: streaming clients against the real server, beside its ceilings, in one run.

    python benchmarks/serve.py [--checkpoint PATH] [--clients 1,4,8,16] [--requests 16] [--json PATH]
                               [--draft-tokens K] [--constrained 8] [--adapters 4]

- The server: the engine and uvicorn in this process (uvicorn in a thread), on a loopback port; each client is
  the official `openai` async client streaming completions one request after another (closed loop). Prompts
  of mixed lengths (--min-prompt .. --max-prompt tokens), --max-tokens each (ignore_eos, so every request
  makes exactly that many).
- Per client count: output tokens/s (all tokens over the wall time of the level), time to first token and
  inter-token latency (p50, p99, from the client's side: the arrival of stream chunks).
- Beside them: the same requests through `mj.generate` one at a time, and the engine's own decode step at
  its full batch (--max-batch rows) called back to back: the tokens/s no schedule of that batch can pass.
- With --draft-tokens K: a second engine drafting by prompt lookup (`serve --draft prompt-lookup`), and per
  prompt set (quote-like: passages and code to repeat or lightly edit; chat-like: open questions; each a chat
  template around one message, greedy, up to --draft-max-tokens, stopping at eos) --clients' largest count of
  streaming clients with and without drafts, interleaved over --draft-rounds (best kept), and whether every
  answer is identical. (--clients '' skips the levels above.)
- With --constrained N: N streaming clients whose answers a JSON schema constrains (a grammar per slot, its
  bitmask filled on the host after every token) against N without, same prompts, and the host time per step.
- With --adapters N: a second engine serving N LoRA adapters (random, rank --adapter-rank, every attention and MLP
  weight; `serve --lora-modules`, --max-loras N) and --adapter-clients clients spread over them against as many
  on the base model of the plain engine, same prompts, interleaved over --draft-rounds (best kept).
With --peer-python PATH: instead, our server (its own process, default flags) beside `transformers serve
--continuous-batching` from that venv, on chat questions (benchmarks/serve_peer.py says how).
Targets (issue 14, CPU): at 8 clients, tokens/s >= 4x one-at-a-time and >= 80% of the batch-8 decode step;
TTFT p99 at 8 clients < 3x TTFT p50 at 1 client. Issue 25: constrained tokens/s >= 0.8x free. Issue 26: clients over
4 adapters >= 0.7x the base's tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
from speculative import CODE, PASSAGE, TASKS  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax.sampling import packed_width  # noqa: E402
from mistral_jax.serving import api, runner  # noqa: E402
from mistral_jax.serving.engine import Engine  # noqa: E402
from mistral_jax.speculative import Speculation  # noqa: E402
from mistral_jax.tokenizers import load_tokenizer  # noqa: E402

QUOTE_LIKE = [TASKS["quote"][1], TASKS["rewrite"][1], TASKS["edit_code"][1],
              f"Copy this passage exactly, then stop.\n\n{PASSAGE}",
              f"Show this code unchanged.\n\n```python\n{CODE}```",
              f"Quote the second sentence of this passage, then the whole passage.\n\n{PASSAGE}",
              f"Add a docstring to `mean` and show the whole code.\n\n```python\n{CODE}```",
              f"Repeat this passage, replacing 'rainforest' with 'jungle'.\n\n{PASSAGE}"]
CHAT_LIKE = [TASKS["chat_story"][1], TASKS["chat_advice"][1], "Why is the sky blue?",
             "Give me three ideas for a birthday party.", "How do I make a good cup of tea?",
             "What is the difference between a virus and a bacterium?", "Write a haiku about autumn.",
             "What should I pack for a weekend of hiking?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(engine: Engine, tokenizer, port: int):
    import uvicorn

    app = api.create_app(engine, tokenizer, "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


async def _client(client, prompts: list[list[int]], max_tokens: int, out: list, ignore_eos: bool,
                  extra: dict | None = None, model: str = "bench") -> None:
    for prompt in prompts:
        start = time.perf_counter()
        stamps, tokens, text = [], 0, []
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": ignore_eos, **(extra or {})},
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            stamps.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            text += [c.text for c in chunk.choices]
        out.append((start, stamps, tokens, (tuple(prompt), "".join(text))))


async def _level(url: str, prompts: list[list[int]], clients: int, max_tokens: int, ignore_eos: bool = True,
                 extra: dict | None = None, models: tuple[str, ...] = ("bench",)) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    shares = [prompts[i::clients] for i in range(clients)]
    records: list = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(client, share, max_tokens, records, ignore_eos, extra, models[i % len(models)])
                           for i, share in enumerate(shares)))
    wall = time.perf_counter() - start
    await client.close()  # inside the loop: closing it after asyncio.run ends fails
    ttft = [stamps[0] - begun for begun, stamps, *_ in records]
    itl = [b - a for _, stamps, *_ in records for a, b in zip(stamps, stamps[1:])]
    tokens = sum(n for _, _, n, _ in records)
    return {"clients": clients, "requests": len(records), "tokens": tokens, "wall_s": wall,
            "texts": dict(r[3] for r in records),
            "tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "itl_p50_s": float(np.percentile(itl, 50)),
            "itl_p99_s": float(np.percentile(itl, 99))}


def _decode_ceiling(engine: Engine, steps: int) -> float:
    """Tokens/s of the engine's decode step at its full batch, run back to back (through the runner's plans)."""
    b = engine.max_batch
    inputs = runner.DecodeInputs(np.zeros(b, np.int32), np.arange(1, b + 1, dtype=np.int32), np.ones(b, np.int32),
                                 np.ones(b, bool),  # every slot live, so the whole batch is timed
                                 np.full((b, packed_width(engine.config.vocab_size)), -1, np.int32),
                                 np.zeros(b, np.int32))  # no adapter
    plan = runner.Plan(decode=inputs)
    engine.runner.run(plan)
    start = time.perf_counter()
    for _ in range(steps):
        engine.runner.run(plan)  # reads every step's tokens back, as the engine does
    return b * steps / (time.perf_counter() - start)


# Answers that never end within --max-tokens, so constrained and free requests make the same number of tokens.
LONG_JSON = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"},
                                                         "minItems": 1000}}, "required": ["values"]}


def _constrained_row(args, engine: Engine, url: str, prompts: list[list[int]]) -> dict:
    """--constrained clients streaming with a JSON schema against as many without, same prompts, interleaved over
    --draft-rounds (best kept); the host time the grammars take per constrained step."""
    clients, extra = args.constrained, {"structured_outputs": {"json": LONG_JSON}}
    asyncio.run(_level(url, prompts[:2], 2, 2, extra=extra))  # the grammar matchers built, connections warm
    free, constrained, mask_s, steps = 0.0, 0.0, 0.0, 0
    for _ in range(args.draft_rounds):
        free = max(free, asyncio.run(_level(url, prompts, clients, args.max_tokens))["tokens_per_s"])
        seconds, counted = engine.mask_seconds, engine.constrained_steps
        constrained = max(constrained, asyncio.run(_level(url, prompts, clients, args.max_tokens,
                                                          extra=extra))["tokens_per_s"])
        mask_s, steps = mask_s + engine.mask_seconds - seconds, steps + engine.constrained_steps - counted
    return {"clients": clients, "free_tokens_per_s": free, "constrained_tokens_per_s": constrained,
            "ratio": constrained / free, "mask_ms_per_step": 1e3 * mask_s / max(steps, 1)}


def _adapter_row(args, config, params, tokenizer, plain_url: str, prompts: list[list[int]]) -> dict:
    """--adapter-clients clients spread over --adapters random LoRA adapters (their own engine, every adapter
    resident) against as many on the base (the plain engine), same prompts, interleaved over --draft-rounds."""
    import tempfile

    import jax

    from mistral_jax import lora
    from mistral_jax.checkpoints import peft
    from mistral_jax.model.transformer import param_shapes
    from mistral_jax.serving.adapters import Adapters

    names, scratch = [f"lora{i}" for i in range(args.adapters)], tempfile.TemporaryDirectory()
    paths = {}
    spec = lora.LoraSpec(args.adapter_rank, 2.0 * args.adapter_rank, tuple(lora.serving_targets(config)))
    scanned = param_shapes(config.replace(scan_layers=True))
    shapes = jax.eval_shape(lambda: lora.init(scanned, spec, jax.random.key(0)))
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        weights = jax.tree.map(lambda x, rng=rng: (0.01 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
        paths[name] = str(peft.write(config, lora.Adapter(weights, spec.scale), pathlib.Path(scratch.name) / name,
                                     base_model="bench"))
    adapters = Adapters(config, paths, max_loras=args.adapters, max_lora_rank=args.adapter_rank)
    engine = Engine(config, params, tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    max_queue=4 * args.requests, adapters=adapters)
    port = _free_port()
    server, thread = _serve(engine.start(), tokenizer, port)
    url, clients = f"http://127.0.0.1:{port}/v1", args.adapter_clients
    models = tuple(names)
    asyncio.run(_level(url, prompts[:len(names)], len(names), 2, models=models))  # every adapter loaded, warm
    base = with_adapters = 0.0
    for _ in range(args.draft_rounds):
        base = max(base, asyncio.run(_level(plain_url, prompts, clients, args.max_tokens))["tokens_per_s"])
        with_adapters = max(with_adapters, asyncio.run(_level(url, prompts, clients, args.max_tokens,
                                                              models=models))["tokens_per_s"])
    server.should_exit = True
    thread.join()
    engine.stop()
    scratch.cleanup()
    return {"clients": clients, "adapters": args.adapters, "rank": args.adapter_rank, "base_tokens_per_s": base,
            "adapter_tokens_per_s": with_adapters, "ratio": with_adapters / base}


def _draft_rows(args, config, params, tokenizer, plain_url: str) -> list[dict]:
    """Per prompt set: tokens/s of the largest client count with and without prompt lookup, best of rounds."""
    started = time.perf_counter()
    engine = Engine(config, params, tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    max_queue=4 * args.requests, speculation=Speculation(args.draft_tokens))
    print(f"prompt lookup engine compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    port = _free_port()
    server, thread = _serve(engine.start(), tokenizer, port)
    urls = {"plain": plain_url, "lookup": f"http://127.0.0.1:{port}/v1"}
    clients = max([int(c) for c in args.clients.split(",") if c] or [args.max_batch])
    rows = []
    for name, messages in {"quote-like": QUOTE_LIKE, "chat-like": CHAT_LIKE}.items():
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": m}]) for m in messages]
        best: dict = {}
        for url in urls.values():
            asyncio.run(_level(url, prompts[:2], 2, 2))  # connections and programs warm
        for _ in range(args.draft_rounds):
            for kind, url in urls.items():
                level = asyncio.run(_level(url, prompts, clients, args.draft_max_tokens, ignore_eos=False))
                if kind not in best or level["tokens_per_s"] > best[kind]["tokens_per_s"]:
                    best[kind] = level
        rows.append({"prompts": name, "clients": clients, "plain_tokens_per_s": best["plain"]["tokens_per_s"],
                     "lookup_tokens_per_s": best["lookup"]["tokens_per_s"],
                     "speedup": best["lookup"]["tokens_per_s"] / best["plain"]["tokens_per_s"],
                     "tokens": best["plain"]["tokens"], "identical": best["plain"]["texts"] == best["lookup"]["texts"]})
        print(f"{name}: {rows[-1]['speedup']:.2f}x", file=sys.stderr, flush=True)
    accepted = engine.metrics.accepted_draft_tokens._value.get()
    generated = engine.metrics.generation_tokens._value.get()
    rows[-1]["note"] = f"drafts kept over all rounds: {accepted:.0f} of {generated:.0f} tokens made"
    server.should_exit = True
    thread.join()
    engine.stop()
    return rows


def main() -> None:
    if any(a.split("=")[0] == "--peer-python" for a in sys.argv[1:]):  # issue 24's table: ours beside the peer
        import serve_peer

        return serve_peer.main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per client count (1 client: half)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--json", default=None)
    parser.add_argument("--draft-tokens", type=int, default=0, help="also compare prompt lookup with k drafts (0: no)")
    parser.add_argument("--draft-max-tokens", type=int, default=96)
    parser.add_argument("--draft-rounds", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=0,
                        help="also compare clients spread over this many LoRA adapters against the base (0: no)")
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--adapter-clients", type=int, default=8)
    parser.add_argument("--constrained", type=int, default=0,
                        help="also compare this many clients with a JSON schema against as many without (0: no)")
    args = parser.parse_args()

    info = _common.machine()
    checkpoint, config, params = _common.load_model(args.checkpoint)
    config, params = mj.unstack_layers(config, params)
    tokenizer = load_tokenizer(checkpoint)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.requests)
    prompts = [rng.integers(100, config.vocab_size, n).tolist() for n in lengths]

    started = time.perf_counter()
    engine = Engine(config, params, tokenizer, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    max_queue=4 * args.requests)
    compile_s = time.perf_counter() - started
    port = _free_port()
    server, thread = _serve(engine.start(), tokenizer, port)
    url = f"http://127.0.0.1:{port}/v1"

    levels = []
    for clients in [int(c) for c in args.clients.split(",") if c]:
        share = prompts if clients > 1 else prompts[: max(2, len(prompts) // 2)]
        asyncio.run(_level(url, share[:2], min(clients, 2), 2))  # connections and programs warm
        levels.append(_level_result := asyncio.run(_level(url, share, clients, args.max_tokens)))
        print(f"{clients} clients: {_level_result['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    drafts = _draft_rows(args, config, params, tokenizer, url) if args.draft_tokens else []
    structured = _constrained_row(args, engine, url, prompts) if args.constrained else None
    adapted = _adapter_row(args, config, params, tokenizer, url, prompts) if args.adapters else None
    server.should_exit = True
    thread.join()
    engine.stop()
    for level in levels:
        level.pop("texts")

    alone = ceiling = None
    if levels:  # the same requests one at a time through mj.generate (each warmed first: its compilation not counted)
        alone_tokens, alone_s = 0, 0.0
        for prompt in prompts:
            mj.generate(config, params, [prompt], args.max_tokens)
            start = time.perf_counter()
            alone_tokens += len(mj.generate(config, params, [prompt], args.max_tokens)[0])
            alone_s += time.perf_counter() - start
        alone = alone_tokens / alone_s
        ceiling = _decode_ceiling(engine, 50)

    at8 = next((lv for lv in levels if lv["clients"] == 8), None)
    at1 = next((lv for lv in levels if lv["clients"] == 1), None)
    targets = {}
    if at8 is not None:
        targets["8 clients >= 4x one at a time"] = at8["tokens_per_s"] / alone >= 4
        targets["8 clients >= 80% of the batch-8 decode step"] = at8["tokens_per_s"] / ceiling >= 0.8
        if at1 is not None:
            targets["TTFT p99 at 8 < 3x TTFT at 1"] = at8["ttft_p99_s"] < 3 * at1["ttft_p50_s"]

    print(f"# serve: {pathlib.Path(checkpoint).name}, {args.max_batch} slots, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens, {args.max_tokens} new tokens each\n{_common.machine_line(info)}\n"
          f"start-up compilation {compile_s:.1f} s\n")
    if drafts:
        print(f"prompt lookup, k = {args.draft_tokens}, {drafts[0]['clients']} streaming clients, up to "
              f"{args.draft_max_tokens} new tokens each (best of {args.draft_rounds} interleaved rounds):\n")
        print(_common.table(["prompts", "plain tok/s", "prompt lookup tok/s", "speedup", "identical"],
                            [[d["prompts"], f"{d['plain_tokens_per_s']:.1f}", f"{d['lookup_tokens_per_s']:.1f}",
                              f"{d['speedup']:.2f}x", d["identical"]] for d in drafts]) + "\n")
    if structured:
        targets["constrained >= 0.8x free"] = structured["ratio"] >= 0.8
        print(f"structured output: {structured['clients']} streaming clients, {args.max_tokens} new tokens each, "
              f"JSON schema (structured_outputs) or none, best of {args.draft_rounds} interleaved rounds:\n")
        print(_common.table(["clients", "free tok/s", "JSON schema tok/s", "ratio", "mask host ms / step"],
                            [[structured["clients"], f"{structured['free_tokens_per_s']:.1f}",
                              f"{structured['constrained_tokens_per_s']:.1f}", f"{structured['ratio']:.2f}x",
                              f"{structured['mask_ms_per_step']:.2f}"]]) + "\n")
    if adapted:
        targets["clients over adapters >= 0.7x the base"] = adapted["ratio"] >= 0.7
        print(f"LoRA adapters: {adapted['clients']} streaming clients over {adapted['adapters']} adapters of rank "
              f"{adapted['rank']} (one engine, every adapter resident) against as many on the base (the plain "
              f"engine), {args.max_tokens} new tokens each, best of {args.draft_rounds} interleaved rounds:\n")
        print(_common.table(["clients", "adapters", "base tok/s", "adapters tok/s", "ratio"],
                            [[adapted["clients"], adapted["adapters"], f"{adapted['base_tokens_per_s']:.1f}",
                              f"{adapted['adapter_tokens_per_s']:.1f}", f"{adapted['ratio']:.2f}x"]]) + "\n")
    if levels:
        rows = [[lv["clients"], lv["requests"], f"{lv['tokens_per_s']:.1f}", f"{lv['tokens_per_s'] / alone:.2f}x",
                 f"{lv['tokens_per_s'] / ceiling:.0%}", f"{lv['ttft_p50_s'] * 1e3:.0f}",
                 f"{lv['ttft_p99_s'] * 1e3:.0f}", f"{lv['itl_p50_s'] * 1e3:.0f}", f"{lv['itl_p99_s'] * 1e3:.0f}"]
                for lv in levels]
        print(_common.table(["clients", "requests", "tok/s", "vs one at a time", "vs decode step", "TTFT p50 ms",
                             "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows))
        print(f"\nmj.generate one at a time: {alone:.1f} tok/s; decode step at batch {args.max_batch}: "
              f"{ceiling:.1f} tok/s")
    for name, met in targets.items():
        print(f"- {name}: {_common.status(met)}")
    _common.write_json(args.json, {"machine": info, "settings": vars(args), "compile_s": compile_s, "levels": levels,
                                   "generate_alone_tokens_per_s": alone, "decode_step_tokens_per_s": ceiling,
                                   "targets": targets, "drafts": drafts,
                                   "structured": structured, "adapters": adapted})


if __name__ == "__main__":
    main()
