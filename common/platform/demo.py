"""`make demo`: the main job end to end, driven only through the public `tokenmill` CLI.

Stages: bring the platform up -> ingest a real corpus -> train a small model with 2 sharded
workers -> list checkpoints -> serve it on 2 replicas behind the router and stream completions
-> summary -> take the platform down (unless --keep-up).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENMILL = str(Path(sys.executable).parent / "tokenmill")
PROMPTS = ("def ", "import ", "class ")
# Chosen by measurement (scripts/demo_sweep.py; figures in the issue-14 note): at equal idle 2-core
# time test-1m (vocab 4096) beat a 4.2 M model (hidden 256) on val loss; 1000 steps of 2 x 8 x 128
# tokens take ~3 idle minutes and bring val loss from 4.65 (300 steps) to ~3.8.
VOCAB_SIZE = 4096
TRAIN = ["--preset", "test-1m", "--seq-len", "128", "--batch", "8", "--lr", "3e-3", "--warmup", "20"]
STEPS = 1000
# Sampling: cooler than the model's distribution and cut to its 40 likeliest tokens, so a small model
# stays on common code patterns instead of drifting into rare tokens.
SAMPLING = ["--max-tokens", "64", "--temperature", "0.6", "--top-k", "40", "--seed", "0"]


def cut_at_last_full_line(text: str) -> str:
    """The text up to its last newline: a completion stopped by max_tokens ends mid-line."""
    end = text.rfind("\n")
    return text[: end + 1] if end >= 0 else ""


def parses_as_python(text: str) -> bool:
    """Whether the full lines of ``text`` (prompt + completion) are valid Python source."""
    source = cut_at_last_full_line(text)
    if not source.strip():
        return False
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


class Demo:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.env = {**os.environ, "TOKENMILL_DATA_DIR": str(data_dir)}
        self.timings: list[tuple[str, float]] = []
        self.checks: list[tuple[str, str, bool]] = []  # prompt, prompt + completion, parses
        self.loss_curve = data_dir / "demo-loss-curve.png"

    def reset(self) -> None:
        """Start from nothing: a platform a previous run left up (--keep-up) goes down, its state goes."""
        if self.data_dir.exists():
            subprocess.call(
                [TOKENMILL, "down"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            shutil.rmtree(self.data_dir)

    def run(self, title: str, *args: str, capture: bool = False) -> str:
        """Run one CLI verb with its output shown live; stop the demo if it fails. With ``capture``,
        stdout is also returned (still streamed to the terminal as it arrives)."""
        print(f"\n\033[1m== {title}\033[0m\n$ tokenmill {' '.join(args)}", flush=True)
        start = time.perf_counter()
        if capture:
            code, out = _tee([TOKENMILL, *args], self.env)
        else:
            code, out = subprocess.call([TOKENMILL, *args], env=self.env), ""
        self.timings.append((title, time.perf_counter() - start))
        if code != 0:
            raise SystemExit(f"demo stage '{title}' failed (exit {code})")
        return out

    def complete(self, prompt: str) -> None:
        """Stream a completion for ``prompt`` and check that its full lines parse as Python."""
        title = f"stream a completion for {prompt!r}"
        out = self.run(title, "generate", prompt, "--stream", *SAMPLING, capture=True)
        text = out.removesuffix("\n")
        ok = parses_as_python(text)
        self.checks.append((prompt, text, ok))
        print(f"-- parses as Python (ast.parse, cut at its last full line): {'yes' if ok else 'no'}")

    def summary(self) -> None:
        print("\n\033[1m== summary\033[0m")
        for title, seconds in self.timings:
            print(f"  {title:<48} {seconds:7.1f} s")
        print(f"  {'total':<48} {sum(s for _, s in self.timings):7.1f} s")
        if self.checks:
            passed = sum(ok for _, _, ok in self.checks)
            print(f"\n  completions that parse as Python: {passed}/{len(self.checks)}")
            for prompt, text, ok in self.checks:
                print(f"  {'yes' if ok else 'no ':<4} {prompt!r:<10} {json.dumps(text)[:90]}")
        if self.loss_curve.exists():
            print(f"\n  loss curve: {self.loss_curve}")


def _tee(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd``, copying its stdout to ours as it arrives (a stream stays live); return it too."""
    chunks: list[bytes] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            chunks.append(chunk)
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(ROOT / ".tokenmill-demo"))
    parser.add_argument("--keep-up", action="store_true", help="leave the platform running afterwards")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
    args = parser.parse_args(argv)
    demo = Demo(Path(args.data_dir))
    demo.reset()
    stdlib = sysconfig.get_paths()["stdlib"]
    try:
        demo.run("platform up (embedded Redis + 5 services)", "up")
        demo.run("platform status", "status")
        ingest = ["data", "ingest", stdlib, "--name", "stdlib", "--preset", "code"]
        demo.run("ingest the Python standard library (code preset)", *ingest, "--vocab-size", str(VOCAB_SIZE))
        train = ["train", "--dataset", "stdlib", "--output", "demo-model", *TRAIN, "--workers", "2"]
        train += ["--steps", str(args.steps), "--eval-every", str(max(1, args.steps // 4))]
        train += ["--checkpoint-every", str(max(1, args.steps // 2)), "--plot", str(demo.loss_curve)]
        demo.run("train a small model from scratch, 2 sharded workers", *train)
        demo.run("checkpoints (stored vs logical bytes)", "ckpt", "list")
        demo.run("serve the model on 2 replicas behind the router", "serve", "demo-model", "--replicas", "2")
        for prompt in PROMPTS:
            demo.complete(prompt)
        demo.run("platform status", "status")
    finally:
        if not args.keep_up:
            demo.run("platform down", "down")
        demo.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
