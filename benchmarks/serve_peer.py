"""Our server beside `transformers serve --continuous-batching` (issue 24's table), one run, one server at a time.

    python benchmarks/serve.py --peer-python /path/to/venv/bin/python [--clients 1,4,8,16] [--requests 16]
                               [--max-tokens 64] [--ours-flags "--page-size 16"] [--json serve_peer.json]

- The peer runs from another virtual environment (torch CPU, transformers and accelerate, which --install-peer
  pip-installs there; never a dependency of this project):
  its `transformers serve --continuous-batching --device cpu` on a loopback port, serving our checkpoint exported
  with `mistral-jax export` (float32), so both serve the same weights and chat template.
- Ours: `mistral-jax serve` with its default flags (plus --ours-flags), in its own process on a loopback port.
- 8 chat questions (20-80 prompt tokens with the template), --max-tokens new tokens, greedy, streamed by the
  official `openai` async client: per client count (closed loop, --requests requests; 1 client: one of each
  question) tokens/s, TTFT p50 (to the first chunk carrying text) and ITL p50 (between chunks carrying text);
  the server's RSS (its process tree) after warm-up and at the end; whether the answers equal the other server's.
- `mj.generate` one request at a time, in this process, on the same questions.
- A shared ~1000-token system prompt: TTFT of the first request against the p50 of the next ones (other
  questions behind the same system prompt: a prefix-cache hit where the server caches prefixes).
- Ours with `--max-seq-len` each of --itl-seq-lens (default 1024 and 32768): 8 clients on the questions (contexts
  of ~100 tokens), ITL p50 and tokens/s: a step's cost should follow the tokens held, not the longest context.
- Ours with `--page-size 16 --max-total-tokens 4096` (plus --ours-flags): 24 requests of ~100 prompt tokens at
  once, each --max-tokens: whether all finish, and the tokens/s.
Tokens are counted by re-tokenizing each answer with our tokenizer (one count for both servers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

from mistral_jax.checkpoints import embedded  # noqa: E402
from mistral_jax.tokenizers import load_tokenizer  # noqa: E402

QUESTIONS = [
    "Why is the sky blue?",
    "Give me three ideas for a birthday party for a seven year old who loves dinosaurs and space.",
    "How do I make a good cup of tea?",
    "What is the difference between a virus and a bacterium, and why do antibiotics only work against one of them?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "I am going hiking for a weekend in the mountains in early spring. The nights will be cold and it may rain. "
    "What should I pack, and what should I leave at home to keep my backpack light?",
    "Explain recursion to a beginner.",
    "My tomato plants have yellow leaves at the bottom and some brown spots on the fruit. The weather has been "
    "hot and humid and I water them every evening. What could be wrong and what should I do about it?",
]
SYSTEM = ("You are a patient assistant for a public library. " + " ".join(
    f"Rule {i}: answer politely, cite the catalogue where it helps, keep answers short and never invent a book, "
    f"an author or a shelf number that the catalogue does not list." for i in range(1, 28)))
BURST = 24  # requests sent at once to the --max-total-tokens 4096 server
STARTUP_S = 900


def _process_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = pathlib.Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in pathlib.Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


class _Server:
    """A server process on a loopback port: started, waited for (GET /health), measured, stopped."""

    def __init__(self, name: str, command: list[str], port: int, model: str, env: dict | None = None) -> None:
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{name}-", suffix=".log", delete=False)
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited while starting (out of memory? see dmesg):\n{self._tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > STARTUP_S:
                self.stop()
                raise RuntimeError(f"{name} did not answer /health within {STARTUP_S} s:\n{self._tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - started

    def _tail(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text()[-4000:]

    @property
    def rss(self) -> int:
        return _process_rss(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _ask(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request -> its start, the arrival time of each chunk carrying text, and its text."""
    start = time.perf_counter()
    stamps, text = [], []
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True)
    async for chunk in stream:
        piece = "".join(c.delta.content or "" for c in chunk.choices)
        if piece:
            stamps.append(time.perf_counter())
            text.append(piece)
    return {"start": start, "stamps": stamps, "text": "".join(text)}


async def _run_clients(server: _Server, jobs: list[list[dict]], clients: int, max_tokens: int) -> tuple[list, float]:
    """`jobs` (message lists) shared out over `clients` closed-loop clients -> (records in job order, wall s)."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800)
    records: list = [None] * len(jobs)

    async def one_client(k: int) -> None:
        for i in range(k, len(jobs), clients):
            records[i] = await _ask(client, server.model, jobs[i], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return records, wall


def _messages(question: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def _measure(server: _Server, args, tokenizer) -> dict:
    """Warm-up, RSS, the client levels, the shared system prompt; answers by question."""
    count = lambda text: len(tokenizer.encode(text, bos=False)) if text else 0  # noqa: E731
    asyncio.run(_run_clients(server, [_messages(q) for q in QUESTIONS], 1, args.max_tokens))  # warm
    asyncio.run(_run_clients(server, [_messages(q) for q in QUESTIONS] * 2, 16, 4))  # batched paths warm
    rss_warm = server.rss
    levels, answers = [], {}
    for clients in args.levels:
        n = len(QUESTIONS) if clients == 1 else max(args.requests, clients)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
        records, wall = asyncio.run(_run_clients(server, [_messages(q) for q in questions], clients, args.max_tokens))
        tokens = sum(count(r["text"]) for r in records)
        ttft = [r["stamps"][0] - r["start"] for r in records if r["stamps"]]
        itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:])]
        for q, r in zip(questions, records):
            answers.setdefault(q, set()).add(r["text"])
        levels.append({"clients": clients, "requests": n, "tokens": tokens, "wall_s": wall,
                       "tokens_per_s": tokens / wall, "ttft_p50_s": float(np.median(ttft)),
                       "itl_p50_s": float(np.median(itl)) if itl else None})
        print(f"{server.name}, {clients} clients: {tokens / wall:.1f} tok/s", file=sys.stderr, flush=True)
    shared = [_messages(q, SYSTEM) for q in QUESTIONS[: args.shared_requests]]
    records, _ = asyncio.run(_run_clients(server, shared, 1, 8))
    ttft = [r["stamps"][0] - r["start"] for r in records if r["stamps"]]
    return {"startup_s": server.startup_s, "rss_after_warm_up": rss_warm, "rss_end": server.rss, "levels": levels,
            "answers": {q: sorted(a) for q, a in answers.items()},
            "shared_prompt": {"system_tokens": count(SYSTEM), "first_ttft_s": ttft[0],
                              "hit_ttft_p50_s": float(np.median(ttft[1:])) if len(ttft) > 1 else None}}


def _burst(args, checkpoint: str, tokenizer) -> dict:
    """24 requests of ~100 prompt tokens at once against ours with --max-total-tokens 4096."""
    port = _free_port()
    flags = ["--page-size", "16", "--max-total-tokens", "4096", "--max-queue", str(4 * BURST), *args.ours]
    server = _Server("ours-4096", _ours_command(checkpoint, port, flags), port, "bench")
    try:
        rng = np.random.default_rng(0)
        words = SYSTEM.split()
        jobs = []
        for i in range(BURST):
            start = int(rng.integers(0, len(words) - 80))
            jobs.append(_messages(f"Question {i}: summarise this. " + " ".join(words[start:start + 60])))
        prompt_tokens = [len(tokenizer.apply_chat_template(m)) for m in jobs]
        asyncio.run(_run_clients(server, jobs[:2], 2, 4))  # warm
        records, wall = asyncio.run(_run_clients(server, jobs, BURST, args.max_tokens))
        tokens = sum(len(tokenizer.encode(r["text"], bos=False)) for r in records if r["text"])
        return {"flags": flags, "requests": BURST, "prompt_tokens_mean": float(np.mean(prompt_tokens)),
                "finished": sum(bool(r["text"]) for r in records), "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "rss": server.rss, "startup_s": server.startup_s}
    finally:
        server.stop()


ITL_CLIENTS = 8


def _itl_rows(args, checkpoint: str, tokenizer, seq_lens: list[int]) -> list[dict]:
    """Ours at each --max-seq-len (plus --ours-flags): ITL p50 and tokens/s of ITL_CLIENTS clients on the
    questions, each a context of ~100 tokens."""
    rows = []
    for n in seq_lens:
        port = _free_port()
        server = _Server(f"ours-{n}", _ours_command(checkpoint, port, ["--max-seq-len", str(n), *args.ours]), port,
                         "bench")
        try:
            jobs = [_messages(QUESTIONS[i % len(QUESTIONS)]) for i in range(max(args.requests, ITL_CLIENTS))]
            asyncio.run(_run_clients(server, jobs[:ITL_CLIENTS], ITL_CLIENTS, 4))  # warm
            records, wall = asyncio.run(_run_clients(server, jobs, ITL_CLIENTS, args.max_tokens))
            tokens = sum(len(tokenizer.encode(r["text"], bos=False)) for r in records if r["text"])
            itl = [b - a for r in records for a, b in zip(r["stamps"], r["stamps"][1:])]
            rows.append({"max_seq_len": n, "tokens_per_s": tokens / wall, "itl_p50_s": float(np.median(itl)),
                         "startup_s": server.startup_s, "rss": server.rss})
            print(f"ours --max-seq-len {n}: ITL p50 {rows[-1]['itl_p50_s'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        finally:
            server.stop()
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours_command(checkpoint: str, port: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "mistral_jax.cli", "serve", "--checkpoint", checkpoint, "--port", str(port),
            "--served-model-name", "bench", *flags]


def _generate_alone(checkpoint: str, tokenizer, max_tokens: int) -> float:
    """mj.generate one question at a time (each warmed first): tokens/s."""
    import mistral_jax as mj

    config, params = mj.load(checkpoint, dtype="float32")
    tokens, seconds = 0, 0.0
    for q in QUESTIONS:
        prompt = tokenizer.apply_chat_template(_messages(q))
        mj.generate(config, params, [prompt], max_tokens)
        start = time.perf_counter()
        tokens += len(mj.generate(config, params, [prompt], max_tokens)[0])
        seconds += time.perf_counter() - start
    return tokens / seconds


PEER_PACKAGES = ("torch", "transformers", "accelerate")  # `transformers serve` places the model through accelerate


def _peer_versions(python: str, install: bool) -> list[str]:
    """[transformers, torch] versions of the peer's venv; with install, its missing packages pip-installed first."""
    probe = "import torch, transformers, accelerate; print(transformers.__version__, torch.__version__)"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if found.returncode and install:
        subprocess.run([python, "-m", "pip", "install", *PEER_PACKAGES], check=True)
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"{python} lacks the peer's packages ({found.stderr.strip().splitlines()[-1]}): "
                         f"`{python} -m pip install {' '.join(PEER_PACKAGES)}`, or pass --install-peer")
    return found.stdout.split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True, help="python of a venv with torch and transformers")
    parser.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per client count above 1")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shared-requests", type=int, default=5, help="requests behind the shared system prompt")
    parser.add_argument("--ours-flags", default="", help="extra `mistral-jax serve` flags (default: none)")
    parser.add_argument("--peer-flags", default="", help="extra `transformers serve` flags (default: none; e.g. "
                                                         "\"--cb-num-blocks 64\" where its default pool of KV blocks "
                                                         "does not fit in the free memory)")
    parser.add_argument("--install-peer", action="store_true",
                        help="pip-install torch, transformers and accelerate into --peer-python's venv if missing")
    parser.add_argument("--no-burst", action="store_true", help="skip the --max-total-tokens 4096 burst")
    parser.add_argument("--itl-seq-lens", default="1024,32768",
                        help="ours at each --max-seq-len, 8 clients: ITL p50 ('' skips)")
    parser.add_argument("--only-itl", action="store_true", help="run only the --itl-seq-lens rows (no peer)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.clients.split(",") if c]
    args.ours = shlex.split(args.ours_flags)
    peer_cli = pathlib.Path(args.peer_python).parent / "transformers"
    if not peer_cli.is_file():
        raise SystemExit(f"{peer_cli} not found: --peer-python must be a venv's python with transformers installed")

    info = _common.machine()
    checkpoint = args.checkpoint or str(embedded.default_model_path())
    tokenizer = load_tokenizer(checkpoint)
    result = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "ours"}}
    seq_lens = [int(n) for n in args.itl_seq_lens.split(",") if n]
    if args.only_itl:
        result["itl_by_max_seq_len"] = _itl_rows(args, checkpoint, tokenizer, seq_lens)
        print(_itl_report(result["itl_by_max_seq_len"]))
        return _common.write_json(args.json, result)
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir = pathlib.Path(scratch) / "hf"
        subprocess.run([sys.executable, "-m", "mistral_jax.cli", "export", checkpoint, str(hf_dir)], check=True)
        version = _peer_versions(args.peer_python, args.install_peer)
        result["peer_versions"] = {"transformers": version[0], "torch": version[1]}
        servers = {}
        port = _free_port()
        servers["ours"] = lambda port=port: _Server("ours", _ours_command(checkpoint, port, args.ours), port, "bench")
        peer_port = _free_port()
        peer_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        servers["peer"] = lambda: _Server(
            "peer", [str(peer_cli), "serve", str(hf_dir), "--continuous-batching", "--device", "cpu", "--dtype",
                     "float32", "--host", "127.0.0.1", "--port", str(peer_port), "--log-level", "warning",
                     *shlex.split(args.peer_flags)],
            peer_port, str(hf_dir), env=peer_env)
        for name, start in servers.items():
            server = start()
            try:
                result[name] = _measure(server, args, tokenizer)
            finally:
                server.stop()
    result["generate_alone_tokens_per_s"] = _generate_alone(checkpoint, tokenizer, args.max_tokens)
    result["burst"] = None if args.no_burst else _burst(args, checkpoint, tokenizer)
    result["itl_by_max_seq_len"] = _itl_rows(args, checkpoint, tokenizer, seq_lens)
    ours, peer = result["ours"], result["peer"]
    same = [q for q in QUESTIONS if q in ours["answers"] and ours["answers"][q] == peer["answers"].get(q)]
    result["identical_answers"] = {"questions": len(QUESTIONS), "identical": len(same),
                                   "differ": [q for q in QUESTIONS if q not in same]}
    print(_report(result, args))
    _common.write_json(args.json, result)


def _report(result: dict, args) -> str:
    def row(name: str, r: dict) -> list:
        lv = r["levels"]
        join = lambda f: " / ".join(f(x) for x in lv)  # noqa: E731
        return [name, join(lambda x: str(x["clients"])), join(lambda x: f"{x['tokens_per_s']:.1f}"),
                join(lambda x: f"{x['ttft_p50_s'] * 1e3:.0f}"),
                join(lambda x: "-" if x["itl_p50_s"] is None else f"{x['itl_p50_s'] * 1e3:.0f}"),
                f"{r['rss_after_warm_up'] / 2**30:.2f} / {r['rss_end'] / 2**30:.2f} GB", f"{r['startup_s']:.0f}"]

    ours_flags = " ".join(args.ours) or "default flags"
    lines = [f"# serve vs transformers serve: {args.max_tokens} new tokens, greedy, streaming chat, "
             f"{len(QUESTIONS)} questions", _common.machine_line(result["machine"]),
             f"peer: transformers {result['peer_versions']['transformers']}, torch {result['peer_versions']['torch']}",
             "", _common.table(["server", "clients", "tok/s", "TTFT p50 ms", "ITL p50 ms",
                                "RSS after warm-up / end", "start-up s"],
                               [row("transformers serve --continuous-batching", result["peer"]),
                                row(f"mistral-jax serve ({ours_flags})", result["ours"])]),
             "", f"mj.generate one request at a time: {result['generate_alone_tokens_per_s']:.1f} tok/s",
             f"identical answers: {result['identical_answers']['identical']} of {len(QUESTIONS)} questions"]
    shared = [[n, r["shared_prompt"]["system_tokens"], f"{r['shared_prompt']['first_ttft_s'] * 1e3:.0f}",
               "-" if r["shared_prompt"]["hit_ttft_p50_s"] is None else
               f"{r['shared_prompt']['hit_ttft_p50_s'] * 1e3:.0f}"] for n, r in
              (("transformers serve", result["peer"]), ("mistral-jax serve", result["ours"]))]
    lines += ["", "shared system prompt (1 client, later requests behind the same system prompt):", "",
              _common.table(["server", "system tokens", "first TTFT ms", "later TTFT p50 ms"], shared)]
    burst = result["burst"]
    if burst is not None:
        lines += ["", f"mistral-jax serve {' '.join(burst['flags'])}: {burst['requests']} requests of "
                      f"~{burst['prompt_tokens_mean']:.0f} prompt tokens at once: {burst['finished']} finished, "
                      f"{burst['tokens_per_s']:.1f} tok/s, RSS {burst['rss'] / 2**30:.2f} GB"]
    if result["itl_by_max_seq_len"]:
        lines += ["", _itl_report(result["itl_by_max_seq_len"])]
    return "\n".join(lines)


def _itl_report(rows: list[dict]) -> str:
    base = rows[0]["itl_p50_s"]
    return "\n".join([f"ITL at {ITL_CLIENTS} clients, ~100-token contexts, by --max-seq-len:", "", _common.table(
        ["--max-seq-len", "tok/s", "ITL p50 ms", "ITL / first row's", "start-up s", "RSS GB"],
        [[r["max_seq_len"], f"{r['tokens_per_s']:.1f}", f"{r['itl_p50_s'] * 1e3:.1f}", f"{r['itl_p50_s'] / base:.2f}",
          f"{r['startup_s']:.0f}", f"{r['rss'] / 2**30:.2f}"] for r in rows])])


if __name__ == "__main__":
    main()
