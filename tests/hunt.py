#!/usr/bin/env python
"""Hunt for counterexamples: fresh seeds, many examples, a database kept between hunts.

CI never runs this: it gates on a fixed seed and the committed examples, so a
counterexample found here does not block an unrelated change. Run it by hand or
from a scheduled job; it writes each counterexample found as a ready-to-pin
``@example(...)`` line, with the test it belongs to:

    python tests/hunt.py                       # every property test, one hunt
    python tests/hunt.py --rounds 3 -k raw     # three seeds, tests matching "raw"
    python tests/hunt.py --save                # also add them to tests/hypothesis-examples/

``--save`` writes the failing examples into the committed database, which the ci
profile replays read-only; pin each as an ``@example`` as well (the findings file
says where). Its exit status is 1 when something was found.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
FALSIFYING = re.compile(r"(?:Falsifying (?:explicit )?example|Failing test case): "
                        r"(?P<test>[\w.]+)\((?P<args>.*?)\n\)", re.DOTALL)
FAILED = re.compile(r"^FAILED (?P<node>\S+)", re.MULTILINE)


def findings(output: str) -> list[tuple[str, str]]:
    """``(test, "@example(...)")`` for each falsifying example pytest printed."""
    found = []
    output = re.sub(r"^E {1,7}", "", output, flags=re.MULTILINE)  # pytest's error margin
    for match in FALSIFYING.finditer(output):
        arguments = " ".join(line.strip() for line in match["args"].strip().splitlines())
        found.append((match["test"], f"@example({arguments.rstrip(',')})"))
    return found


def hunt(pytest_args: list[str], save: bool, seed: int) -> str:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "hunt"}
    if save:
        env["CAMFUNC_HUNT_DATABASE"] = str(TESTS / "hypothesis-examples")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p",
                           "no:cacheprovider", f"--hypothesis-seed={seed}", str(TESTS),
                           *pytest_args],
                          env=env, capture_output=True, text=True)
    return done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="hunts, each from a fresh seed")
    parser.add_argument("--save", action="store_true",
                        help="save what fails into tests/hypothesis-examples/ for CI to replay")
    parser.add_argument("--out", default="hunt-findings.md", help="where the findings go")
    args, pytest_args = parser.parse_known_args(argv)
    lines, seen = [], set()
    for round_number in range(args.rounds):
        seed = random.SystemRandom().randrange(2**32)
        output = hunt(pytest_args, args.save, seed)
        print(f"round {round_number + 1}: seed {seed}, "
              f"{len(FAILED.findall(output))} failed test(s)")
        for node in FAILED.findall(output):
            print(f"  {node}")
        for test, example in findings(output):
            if (test, example) not in seen:
                seen.add((test, example))
                lines.append(f"- `{test}` (seed {seed}):\n\n      {example}\n")
    Path(args.out).write_text("# Counterexamples found by tests/hunt.py\n\n" + (
        "\n".join(lines) if lines else "None.\n"))
    print(f"{len(lines)} counterexample(s); wrote {args.out}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
