"""Evaluation tasks in lm-evaluation-harness's YAML format (the zero-shot subset), read without lm-eval.

The same task file must give the same numbers here and under lm-eval, so the fields mean exactly
what they mean there: ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` name a document field
or are Jinja templates rendered with StrictUndefined; multiple-choice continuations are
``target_delimiter + choice``; documents come from JSON-lines files named in
``dataset_kwargs.data_files`` (``dataset_path: json``), relative to the task file. Code tasks add a
``pass_at_k`` metric: the document's ``doc_to_target`` is the test program run against the
completion in the sandbox.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from tokenmill.common.errors import InvalidArgument

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "generate_until")
METRICS = {
    "multiple_choice": {"acc", "acc_norm"},
    "loglikelihood": {"acc", "perplexity"},
    "generate_until": {"exact_match", "pass_at_k"},
}
_ENV = jinja2.Environment(
    loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)


@dataclass(frozen=True)
class Instance:
    """One document made concrete: the context and what is scored or compared against it."""

    context: str
    target: Any  # gold index (multiple_choice), continuation text, expected answer or test program
    choices: tuple[str, ...] = ()  # multiple_choice answers as written (acc_norm divides by their length)
    delimiter: str = " "

    @property
    def continuations(self) -> list[str]:
        """What is scored after the context for each choice (lm-eval: target_delimiter + choice)."""
        return [f"{self.delimiter}{c}" for c in self.choices]


@dataclass
class Task:
    name: str
    output_type: str
    docs: list[dict[str, Any]]
    doc_to_text: str
    doc_to_target: str | int
    doc_to_choice: str | list[str] | None = None
    target_delimiter: str = " "
    description: str = ""
    metrics: tuple[str, ...] = ()
    pass_k: tuple[int, ...] = (1,)
    generation: dict[str, Any] = field(default_factory=dict)

    def _render(self, spec: str | int | list, doc: dict[str, Any]) -> Any:
        if not isinstance(spec, str):
            return spec
        if spec in doc:
            return doc[spec]
        try:
            return _ENV.from_string(spec).render(**doc)
        except jinja2.TemplateError as e:
            raise InvalidArgument(f"task {self.name!r}: template {spec!r} fails on a document: {e}") from e

    def instance(self, doc: dict[str, Any]) -> Instance:
        context = self.description + str(self._render(self.doc_to_text, doc))
        target = self._render(self.doc_to_target, doc)
        if self.output_type != "multiple_choice":
            return Instance(context, target)
        choices = self._choices(doc)
        gold = int(target) if isinstance(target, int) or str(target).isdigit() else _index_of(target, choices)
        if not 0 <= gold < len(choices):
            raise InvalidArgument(
                f"task {self.name!r}: gold answer {gold} is not one of {len(choices)} choices"
            )
        return Instance(context, gold, tuple(choices), self.target_delimiter)

    def _choices(self, doc: dict[str, Any]) -> list[str]:
        spec = self.doc_to_choice
        raw = doc.get(spec) if isinstance(spec, str) and spec in doc else self._render(spec or [], doc)
        if isinstance(raw, str):
            raw = ast.literal_eval(raw)
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
            raise InvalidArgument(f"task {self.name!r}: doc_to_choice must give a non-empty list of strings")
        return raw

    def instances(self, limit: int | None = None) -> list[Instance]:
        return [self.instance(d) for d in self.docs[:limit]]


def _index_of(target: Any, choices: list[str]) -> int:
    try:
        return choices.index(str(target))
    except ValueError:
        raise InvalidArgument(f"gold answer {target!r} is not among the choices {choices}") from None


def _read_docs(task_dir: Path, cfg: dict[str, Any], name: str) -> list[dict[str, Any]]:
    if cfg.get("dataset_path") != "json":
        raise InvalidArgument(f"task {name!r}: only dataset_path: json (local JSON-lines files) is supported")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    split = cfg.get("test_split") or cfg.get("validation_split") or "test"
    rel = files.get(split) if isinstance(files, dict) else files
    if not rel:
        raise InvalidArgument(f"task {name!r}: dataset_kwargs.data_files has no {split!r} split")
    path = (task_dir / rel).resolve()
    if not path.is_file():
        raise InvalidArgument(f"task {name!r}: data file {path} does not exist")
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not docs:
        raise InvalidArgument(f"task {name!r}: {path} has no documents")
    return docs


def _metrics(cfg: dict[str, Any], output_type: str, name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    entries = cfg.get("metric_list") or [{"metric": m} for m in sorted(METRICS[output_type])[:1]]
    names: list[str] = []
    ks: tuple[int, ...] = (1,)
    for entry in entries:
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if metric not in METRICS[output_type]:
            raise InvalidArgument(
                f"task {name!r}: metric {metric!r} does not apply to {output_type}; use one of "
                f"{sorted(METRICS[output_type])}"
            )
        names.append(metric)
        if metric == "pass_at_k":
            ks = tuple(int(k) for k in entry.get("k", [1]))
    return tuple(names), ks


def load_task(path: str | Path) -> Task:
    """Parse one task file (YAML or JSON); everything is checked before any model work."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidArgument(f"cannot read task file {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"task file {path} must hold a mapping")
    name = str(cfg.get("task") or path.stem)
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgument(f"task {name!r}: output_type {output_type!r} is not one of {OUTPUT_TYPES}")
    if int(cfg.get("num_fewshot") or 0) != 0:
        raise InvalidArgument(f"task {name!r}: only zero-shot tasks are supported (num_fewshot: 0)")
    for key in ("doc_to_text", "doc_to_target"):
        if key not in cfg:
            raise InvalidArgument(f"task {name!r}: {key} is required")
    if output_type == "multiple_choice" and "doc_to_choice" not in cfg:
        raise InvalidArgument(f"task {name!r}: multiple_choice needs doc_to_choice")
    metrics, ks = _metrics(cfg, output_type, name)
    task = Task(
        name=name,
        output_type=output_type,
        docs=_read_docs(path.parent, cfg, name),
        doc_to_text=cfg["doc_to_text"],
        doc_to_target=cfg["doc_to_target"],
        doc_to_choice=cfg.get("doc_to_choice"),
        target_delimiter=cfg.get("target_delimiter", " "),
        description=cfg.get("description", ""),
        metrics=metrics,
        pass_k=ks,
        generation=dict(cfg.get("generation_kwargs") or {}),
    )
    task.instance(task.docs[0])  # a template that cannot render fails here, not mid-run
    return task


SUITES = Path(__file__).resolve().parent / "suites"


def load_suite(name_or_dir: str | Path) -> list[Task]:
    """A suite: every task file in a folder, sorted by name. A bare name is a suite shipped here."""
    directory = Path(name_or_dir)
    if not directory.is_dir():
        directory = SUITES / str(name_or_dir)
        if not directory.is_dir():
            shipped = sorted(p.name for p in SUITES.iterdir() if p.is_dir())
            raise InvalidArgument(
                f"no suite {str(name_or_dir)!r}: give a folder of task files or one of {shipped}"
            )
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml"))
    if not files:
        raise InvalidArgument(f"suite folder {directory} holds no task files (*.yaml)")
    return [load_task(p) for p in files]
