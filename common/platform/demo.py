"""`make demo`: the main job end to end, driven only through the public `tokenmill` CLI.

Stages: bring the platform up -> ingest a real corpus -> train a small model with 2 sharded
workers -> list checkpoints -> serve it on 2 replicas behind the router and stream completions
-> summary -> take the platform down (unless --keep-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKENMILL = str(Path(sys.executable).parent / "tokenmill")


class Demo:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.env = {**os.environ, "TOKENMILL_DATA_DIR": str(data_dir)}
        self.timings: list[tuple[str, float]] = []

    def reset(self) -> None:
        """Start from nothing: a platform a previous run left up (--keep-up) goes down, its state goes."""
        if self.data_dir.exists():
            subprocess.call(
                [TOKENMILL, "down"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            shutil.rmtree(self.data_dir)

    def run(self, title: str, *args: str) -> None:
        """Run one CLI verb with its output shown live; stop the demo if it fails."""
        print(f"\n\033[1m== {title}\033[0m\n$ tokenmill {' '.join(args)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([TOKENMILL, *args], env=self.env)
        self.timings.append((title, time.perf_counter() - start))
        if code != 0:
            raise SystemExit(f"demo stage '{title}' failed (exit {code})")

    def summary(self) -> None:
        print("\n\033[1m== summary\033[0m")
        for title, seconds in self.timings:
            print(f"  {title:<48} {seconds:7.1f} s")
        print(f"  {'total':<48} {sum(s for _, s in self.timings):7.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=str(ROOT / ".tokenmill-demo"))
    parser.add_argument("--keep-up", action="store_true", help="leave the platform running afterwards")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args(argv)
    demo = Demo(Path(args.data_dir))
    demo.reset()
    stdlib = sysconfig.get_paths()["stdlib"]
    try:
        demo.run("platform up (embedded Redis + 5 services)", "up")
        demo.run("platform status", "status")
        ingest = ["data", "ingest", stdlib, "--name", "stdlib", "--preset", "code", "--vocab-size", "4096"]
        demo.run("ingest the Python standard library (code preset)", *ingest)
        train = ["train", "--dataset", "stdlib", "--output", "demo-model", "--preset", "test-1m"]
        train += ["--workers", "2", "--steps", str(args.steps), "--lr", "3e-3", "--warmup", "20"]
        train += ["--eval-every", "100", "--checkpoint-every", "100"]
        demo.run("train a small model from scratch, 2 sharded workers", *train)
        demo.run("checkpoints (stored vs logical bytes)", "ckpt", "list")
        demo.run("serve the model on 2 replicas behind the router", "serve", "demo-model", "--replicas", "2")
        for prompt in ("def ", "import ", "class "):
            demo.run(
                f"stream a completion for {prompt!r}", "generate", prompt, "--stream", "--max-tokens", "48"
            )
        demo.run("platform status", "status")
    finally:
        if not args.keep_up:
            demo.run("platform down", "down")
        demo.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
