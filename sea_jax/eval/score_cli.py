"""``python -m sea_jax.eval score``: score a predictions file with no model loaded.

Usage::

    python -m sea_jax.eval score --benchmark=NAME --predictions=FILE --annotations=FILE
                                 [--questions=FILE] [--out=FILE]

Prints the scores as JSON (percentages) and exits 0; on bad input prints one line
``error: ...`` to stderr and exits 2. ``--out`` also writes the JSON to a file.

Accepted predictions (every benchmark also takes LLaVA's answers file, ``*.jsonl`` lines
``{"question_id", "prompt", "text", ...}`` as ``model_vqa*.py`` and ``write_llava_answers`` write
them; ``text`` is the raw output and gets LLaVA's post-processing):

=========  ==============================================  ===================================
benchmark  official / other predictions format              ``--annotations``
=========  ==============================================  ===================================
vqav2      EvalAI results ``[{"question_id", "answer"}]``  VQA annotations JSON
           (scored as is)                                  (``{"annotations": [...]}``)
textvqa    ``[{"question_id": <TextVQA int id>,            ``TextVQA_0.5.1_val.json``
           "answer"}]``; LLaVA's file is matched by
           (image id, question read from ``prompt``)
gqa        ``[{"questionId", "prediction"}]`` (as is)      ``testdev_balanced_questions.json``
vizwiz     EvalAI results ``[{"image", "answer"}]``        VizWiz annotations JSON (val);
           (as is); LLaVA's file needs ``--questions``     ``--questions``: ``llava_test.jsonl``
scienceqa  ``[{"question_id", "answer"}]``                 ``problems.json`` (+ ``pid_splits.json``
                                                           in the same directory)
pope       ``[{"question_id", "answer"}]``                 the ``pope`` directory (or its
                                                           ``coco`` label directory);
                                                           ``--questions`` defaults to its
                                                           ``llava_pope_test.jsonl``
mmbench    the submission table (``.tsv``/``.xlsx``,       the MMBench TSV
           ``index`` + ``prediction``);
           ``[{"question_id", "answer"}]``
mme        LLaVA's answers file only                       ``MME_Benchmark_release_version``
mmvet      (none: GPT-4 graded; exits 2)
=========  ==============================================  ===================================

``argv`` may start with the word ``score`` (the sub-command) or not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from sea_jax.eval.benchmarks import BENCHMARKS, get_benchmark
from sea_jax.eval.common import EvalInputError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise EvalInputError(f"score: {message}")


def _parser() -> _Parser:
    p = _Parser(prog="python -m sea_jax.eval score",
                description="Score a benchmark predictions file (no model loaded).")
    p.add_argument("--benchmark", required=True, help=", ".join(sorted(BENCHMARKS)))
    p.add_argument("--predictions", required=True, help="predictions file (see module docs)")
    p.add_argument("--annotations", help="the benchmark's scoring annotations")
    p.add_argument("--questions", help="LLaVA question file (vizwiz, pope)")
    p.add_argument("--out", help="also write the scores JSON here")
    return p


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_score(argv: Sequence[str]) -> dict[str, Any]:
    """Parses ``argv`` and returns ``{"benchmark", "predictions", "annotations", "scores"}``.

    Raises:
      EvalInputError: bad arguments or input files.
    """
    argv = list(argv)
    if argv and argv[0] == "score":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    bench = get_benchmark(args.benchmark)
    if args.annotations is None and bench.name != "mmvet":
        raise EvalInputError(f"score: --annotations is required for {bench.name}")
    scores = bench.score(args.predictions, args.annotations, args.questions)
    result = {"benchmark": bench.name, "predictions": os.path.abspath(args.predictions),
              "annotations": None if args.annotations is None else os.path.abspath(
                  args.annotations), "scores": _finite(scores)}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return result


def score_main(argv: Sequence[str]) -> int:
    """The ``score`` command: prints the scores JSON and returns 0, or prints one ``error:``
    line to stderr and returns 2 on bad input (no traceback)."""
    try:
        result = run_score(argv)
    except EvalInputError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
