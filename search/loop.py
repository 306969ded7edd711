"""The search loop: propose a generation, evaluate it, record every result as it finishes,
tell the optimizer, until the budget is spent. Then judge the best merge against the sources
and the uniform merge on both splits, write it, and write the report.

    search = Search.prepare(recipe, out_dir)   # every check, nothing loaded
    summary = search.run(resume=False)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.exceptions import StorageInternalError

from evomerge.evals.suite import TaskSuite
from evomerge.merge.errors import first_line
from evomerge.merge.recipe import Recipe
from evomerge.merge.refs import source_bytes, source_identity
from evomerge.merge.staging import check_can_create, write_text
from evomerge.search import baselines
from evomerge.search.baselines import Planned
from evomerge.search.config import (
    BudgetSpec,
    DfsSpec,
    OptimizerSpec,
    PsDfsSpec,
    SearchRecipe,
    SpaceSpec,
)
from evomerge.search.errors import SearchError
from evomerge.search.executor import Executor
from evomerge.search.fitness import IRT_SOURCES, FitnessPolicy, check_mode, make_policy
from evomerge.search.journal import Journal, recipe_hash, redact, storage_problem
from evomerge.search.lock import output_lock
from evomerge.search.observers import Observer, Progress, notify
from evomerge.search.optimizers import MULTI_OBJECTIVE, check_optimizer, make_optimizer
from evomerge.search.records import ModelScores, Outcome, SearchSummary, TrialRecord
from evomerge.search.space import GeneSpace, ParameterSpace

if TYPE_CHECKING:
    from evomerge.search.stages import StagedSearch

Echo = Callable[[str], None]
SPLITS = ("fitness", "heldout")
SOURCES, SOURCES_CHANGED = "sources", "sources_changed"  # study attributes


@dataclass
class Search:
    recipe: SearchRecipe
    out: Path
    space: GeneSpace
    objectives: list[str]
    storage: str
    title: str = "search"
    baselines: list[Planned] = field(default_factory=list)
    allow_changed_sources: bool = False  # --resume a study whose sources changed (recorded)
    # Each source's identity when this process first looked (the `sources` property).
    _sources: dict[str, str] | None = field(default=None, init=False, repr=False)

    @classmethod
    def prepare(
        cls, recipe: SearchRecipe, out: Path, *, storage: str | None = None, title: str = "search"
    ) -> Search | StagedSearch:
        """Everything that can be checked without loading a model or a dataset."""
        check_can_create(out, SearchError)
        planned = preflight(recipe)
        if isinstance(recipe.space, PsDfsSpec):
            from evomerge.search.stages import StagedSearch, stage_recipes

            ps_stage, _ = stage_recipes(recipe, out)  # the DFS stage needs stage 1's model
            cls.prepare(ps_stage, out / "ps", storage=storage, title=title)
            return StagedSearch(recipe, out, storage, title)
        space = make_space(recipe)
        objectives = [entry.task for entry in recipe.fitness.tasks]
        storage = storage or recipe.storage or f"sqlite:///{(out / 'study.db').resolve()}"
        return cls(recipe, out, space, objectives, storage, title, planned)

    @property
    def multi_objective(self) -> bool:
        return self.recipe.optimizer.backend == "optuna" and (
            self.recipe.optimizer.name in MULTI_OBJECTIVE
        )

    def run(
        self,
        *,
        resume: bool = False,
        echo: Echo = print,
        progress: bool = True,
        executor: Executor | None = None,
        write_model: bool = True,
        allow_changed_sources: bool = False,
    ) -> SearchSummary:
        from evomerge.evals.suite import prepare_suites

        self.allow_changed_sources = allow_changed_sources
        suites = prepare_suites(self.recipe.fitness)  # builds the tasks: a missing one fails here
        threads = torch.get_num_threads()
        with output_lock(self.out):  # one search per output folder at a time
            try:
                return self._run(suites, resume, echo, progress, executor, write_model)
            except StorageInternalError as exc:  # the database failed under us (full, locked)
                raise self._storage_failed(exc) from None
            except KeyError:  # what Optuna raises for a study deleted under it
                if self._study_exists():
                    raise
                raise self._study_deleted(f"study {self.recipe.study_name!r}") from None
            finally:
                torch.set_num_threads(threads)  # the caller's setting, as it was

    def _study_exists(self) -> bool:
        if self._sqlite_file_gone():  # opening it would create an empty one
            return False
        try:
            names = optuna.study.get_all_study_names(storage=self.storage)
        except Exception:  # the storage itself is unreadable: not a deletion
            return True
        return self.recipe.study_name in names

    def _study_deleted(self, what: str) -> SearchError:
        return SearchError(
            f"{redact(self.storage)}: {what} was deleted while the search ran (by another "
            "process?), and its trials with it; run the search again without --resume"
        )

    def _sqlite_file_gone(self) -> bool:
        sqlite_file = self.storage.removeprefix("sqlite:///")
        return sqlite_file != self.storage and not Path(sqlite_file).exists()

    def _storage_failed(self, exc: Exception) -> SearchError:
        if self._sqlite_file_gone():
            return self._study_deleted("the study's database file")
        cause = storage_problem(exc.__cause__ or exc, self.storage)
        return SearchError(
            f"{redact(self.storage)}: the study's database failed: {cause}; every finished "
            "trial is recorded: fix the cause and run again with --resume"
        )

    def _run(
        self,
        suites: dict[str, TaskSuite],
        resume: bool,
        echo: Echo,
        progress: bool,
        executor: Executor | None,
        write_model: bool,
    ) -> SearchSummary:
        _set_threads(self.recipe)
        if write_model:
            self._check_free_space()
        if executor is None:
            executor = self.space.make_executor(self.recipe, suites)
        try:
            journal, policy = self.evolve(suites, executor, resume=resume, echo=echo,
                                          progress=progress)  # fmt: skip
            randoms = None
            if baselines.wants_random(self.recipe):
                # The `random` baseline: genomes drawn uniformly within the genes' bounds, as
                # many as the search evaluated, with the same fitness mode, in a study of its own.
                evaluations = len(journal.finished())
                echo(f"baseline: random search, {evaluations} evaluations")
                uniform = OptimizerSpec(backend="optuna", name="RandomSampler",
                                        population=self.recipe.optimizer.population)  # fmt: skip
                randoms = self.evolve(
                    suites, executor, resume=resume, echo=echo, progress=progress,
                    optimizer=uniform, study=f"{self.recipe.study_name}-random",
                    evaluations=evaluations, inherit=journal,
                )  # fmt: skip
            try:
                summary = self._finish(
                    journal, executor, policy, suites, echo, write_model, randoms
                )
            except (SearchError, StorageInternalError, OSError, MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # a held-out metric or the report failing at the end
                raise SearchError(
                    f"{self.out}: the search finished ({len(journal.finished())} trials "
                    f"recorded) but its final step failed: {first_line(exc, with_type=True)}; "
                    "fix that and run the search again with --resume to redo only the final "
                    "scores, model and report"
                ) from None
        finally:
            executor.close()
        return summary

    def evolve(
        self,
        suites: dict[str, TaskSuite],
        executor: Executor,
        *,
        resume: bool,
        echo: Echo = print,
        progress: bool = True,
        optimizer: OptimizerSpec | None = None,
        study: str | None = None,
        evaluations: int | None = None,
        inherit: Journal | None = None,
    ) -> tuple[Journal, FitnessPolicy]:
        """The search proper: its study, optimizer and fitness policy, candidates evaluated by
        `executor` until the budget is spent. Another `optimizer`, `study` and number of
        `evaluations` run another search over the same space (the random baseline; benchmarks
        comparing strategies on one executor); `inherit`: a study whose scoring of the sources
        (for IRT) serves again. `run` adds the baselines and the end."""
        recipe = self.recipe
        spec = optimizer or recipe.optimizer
        journal = Journal(
            self.storage,
            study or recipe.study_name,
            self.space.genes,
            self.objectives,
            recipe.fingerprint(),
            multi_objective=spec.backend == "optuna" and spec.name in MULTI_OBJECTIVE,
            resume=resume,
            where=f"{self.out}: ",
        )
        self._check_sources(journal, echo)
        if inherit is not None and journal.get_attr(IRT_SOURCES) is None:
            stored = inherit.get_attr(IRT_SOURCES)
            if stored is not None:
                journal.set_attr(IRT_SOURCES, stored)
        budget = evaluations or recipe.budget.evaluations
        strategy = make_optimizer(self.space, spec, journal, budget=budget, seed=recipe.seed)
        policy = make_policy(
            recipe,
            suites,
            journal,
            optuna=spec.backend == "optuna",
            population=strategy.population,  # type: ignore[attr-defined]
        )
        policy.prepare(executor)
        self._loop(journal, strategy, executor, echo, progress, policy, evaluations)
        return journal, policy

    @property
    def sources(self) -> dict[str, str]:
        """Each source's identity (merge/refs.py: headers and sampled bytes), taken once."""
        if self._sources is None:
            models = self.recipe.merge.referenced_models()
            self._sources = {model: source_identity(model) for model in models}
        return self._sources

    def _check_sources(self, journal: Journal, echo: Echo) -> None:
        """The study keeps its sources' identity: a study resumed on other files would mix two
        searches into one result, so it is refused unless asked for (and then recorded)."""
        stored = journal.get_attr(SOURCES)
        if stored is None:
            journal.set_attr(SOURCES, self.sources)
            return
        now = self.sources
        changed = sorted(m for m in {*stored, *now} if stored.get(m) != now.get(m))
        if not changed:
            return
        if not self.allow_changed_sources:
            raise SearchError(
                f"{self.out}: the sources changed since the study began ({', '.join(changed)}); "
                "restore them, or pass --allow-changed-sources with --resume to go on with the "
                "new files (recorded in the study)"
            )
        history = journal.get_attr(SOURCES_CHANGED, [])
        journal.set_attr(SOURCES_CHANGED, [*history, {"after_trial": journal.n_trials(),
                                                      "sources": changed}])  # fmt: skip
        journal.set_attr(SOURCES, now)
        for key in journal.study.user_attrs:  # scores of the old files: scored again
            if key in ("references", IRT_SOURCES) or key.startswith("baseline:"):
                journal.set_attr(key, None)
        echo(f"warning: going on with changed sources ({', '.join(changed)}); the study says so")

    def _check_sources_unchanged(self, step: str) -> None:
        now = {model: source_identity(model) for model in self.sources}
        changed = sorted(m for m in self.sources if now[m] != self.sources[m])
        if changed:
            raise SearchError(
                f"{self.out}: {', '.join(changed)} changed while the search ran, before {step}; "
                "the study is kept: restore the file(s) and run the search again with --resume "
                "to redo only the final scores and model"
            )

    # --- the loop ------------------------------------------------------------------------------

    def _loop(
        self,
        journal: Journal,
        optimizer: Any,
        executor: Executor,
        echo: Echo,
        progress: bool,
        policy: FitnessPolicy,
        evaluations: int | None = None,  # instead of the recipe's budget (the random baseline)
    ) -> None:
        """Ask a generation, evaluate what is new through the policy's tickets, record and
        tell, until the budget is spent. The policy and the progress follow as observers:
        every outcome in trial order (resumed ones included), then every finished generation."""
        budget = self.recipe.budget
        if evaluations is not None:
            budget = BudgetSpec(evaluations=evaluations)
        previous = journal.finished()
        if previous:
            echo(f"resuming: {len(previous)} finished trials in {redact(self.storage)}")
        clock = Progress(journal, budget.evaluations, previous, enabled=progress)
        observers: list[Observer] = [policy, clock]
        tell_seconds = 0.0
        while not self._spent(budget, optimizer.proposed, clock.elapsed, echo):
            n = optimizer.next_batch()
            if budget.evaluations is not None:
                n = min(n, budget.evaluations - optimizer.proposed)
            tick = time.perf_counter()
            proposals = optimizer.ask(n)
            ask_seconds = (time.perf_counter() - tick + tell_seconds) / max(len(proposals), 1)
            outcomes: dict[int, Outcome] = {}
            for proposal in proposals:  # resumed trials come first in their generation
                if proposal.done is not None:
                    outcomes[proposal.number] = proposal.done.outcome
                    notify(observers, "finished", proposal, proposal.done.outcome)
            todo = [p for p in proposals if p.done is None]
            candidates = [self.space.candidate(p.genome) for p in todo]
            evaluated = executor.evaluate(candidates, (policy.ticket(p) for p in todo))
            for proposal, outcome in zip(todo, evaluated, strict=True):
                outcome.seconds["optimizer"] = ask_seconds
                recipe = self.space.to_recipe(proposal.genome)
                optimizer.record(proposal, outcome, recipe_hash(recipe))
                outcomes[proposal.number] = outcome
                notify(observers, "finished", proposal, outcome)
            tick = time.perf_counter()
            generation = [outcomes[p.number] for p in proposals]
            for proposal, outcome in zip(proposals, generation, strict=True):
                optimizer.tell(proposal, outcome)
            tell_seconds = time.perf_counter() - tick
            if proposals:
                notify(observers, "generation_done", proposals[0].generation, generation)
        clock.close()

    @staticmethod
    def _spent(budget: BudgetSpec, proposed: int, elapsed: float, echo: Echo) -> bool:
        if budget.evaluations is not None and proposed >= budget.evaluations:
            return True
        if budget.seconds is not None and elapsed >= budget.seconds:
            echo(f"wall-clock budget of {budget.seconds:g} s reached")
            return True
        return False

    # --- the end -------------------------------------------------------------------------------

    def _finish(
        self,
        journal: Journal,
        executor: Executor,
        policy: FitnessPolicy,
        suites: dict[str, TaskSuite],
        echo: Echo,
        write_model: bool,
        randoms: tuple[Journal, FitnessPolicy] | None = None,
    ) -> SearchSummary:
        from evomerge.search.report import write_report

        started = time.monotonic()
        trials = journal.finished()
        completed = [t for t in trials if not t.outcome.failed]
        if not completed:
            raise SearchError(
                f"{self.out}: no candidate could be evaluated ({len(trials)} failed; first: "
                f"{trials[0].outcome.error if trials else 'none ran'}); see the study for errors"
            )
        self._check_sources_unchanged("the final scores")
        best, best_fitness, rescored, exact = self.choose(completed, executor, policy, echo)
        pareto = _pareto(completed, self.objectives) if self.multi_objective else []
        best_recipe = self.space.to_recipe(best.genome)
        best_yaml = _best_recipe_text(best_recipe, best, self, best_fitness)
        write_text(self.out / "best_recipe.yaml", best_yaml)
        if pareto:
            for number in pareto:
                trial = next(t for t in completed if t.number == number)
                text = _best_recipe_text(self.space.to_recipe(trial.genome), trial, self)
                write_text(self.out / "pareto" / f"trial-{number}.yaml", text)
        echo(f"best: trial {best.number}, fitness {best_fitness:.4f}")
        references = self._references(journal, executor, policy, suites, best, echo)
        references += self._baselines(journal, executor, suites, echo, randoms)
        write_text(
            self.out / "scores.json",
            json.dumps([r.to_dict() for r in references], indent=2) + "\n",
        )
        journal.study.trials_dataframe().to_csv(self.out / "trials.csv", index=False)
        if write_model:
            self._check_sources_unchanged("writing the best model")
            self._write_model(best.genome, echo)
        cost = fitness_cost(trials, policy, rescored, exact)
        cost["search_seconds"] = float(journal.get_attr("seconds", 0.0))
        random_seconds = float(randoms[0].get_attr("seconds", 0.0)) if randoms else 0.0
        cost["wall_seconds"] = cost["search_seconds"] + random_seconds + (
            time.monotonic() - started
        )
        summary = SearchSummary(
            title=self.title,
            genes=self.space.genes,
            trials=trials,
            best=best,
            references=references,
            objectives=self.objectives,
            pareto=pareto,
            best_recipe_yaml=best_yaml,
            settings=self._settings(),
            cost=cost,
        )
        write_text(self.out / "summary.json", json.dumps(summary_json(summary), indent=2) + "\n")
        report = write_report(summary, self.out)
        echo(f"wrote {self.out / 'best_recipe.yaml'}, {report}")
        return summary

    def choose(
        self,
        completed: list[TrialRecord],
        executor: Executor,
        policy: FitnessPolicy,
        echo: Echo,
    ) -> tuple[TrialRecord, float, dict[int, dict], dict[int, float | None]]:
        """The best trial by exact fitness (estimates of the best few re-scored on every row
        first: a lucky estimate cannot win), its fitness, the re-scored and the exact ones."""
        if any(not t.outcome.full for t in completed) and policy.rescore_count:
            echo(f"re-scoring the {policy.rescore_count} best estimates on every fitness row")
        rescored = policy.rescore(completed, executor, self.space)
        exact = {t.number: t.outcome.fitness for t in completed if t.outcome.full}
        exact.update({n: r["fitness"] for n, r in rescored.items()})
        pool = [t for t in completed if t.number in exact] or completed
        best = max(pool, key=lambda t: (exact.get(t.number, t.outcome.fitness), -t.number))
        return best, exact.get(best.number, best.outcome.fitness), rescored, exact

    def _baselines(
        self,
        journal: Journal,
        executor: Executor,
        suites: dict[str, TaskSuite],
        echo: Echo,
        randoms: tuple[Journal, FitnessPolicy] | None,
    ) -> list[ModelScores]:
        """The recipe's baselines on both splits (search/baselines.py), each kept in the study."""
        splits = [split for split in SPLITS if split in suites]
        if self.baselines or randoms:
            names = [p.name for p in self.baselines] + ["random search"] * bool(randoms)
            echo(f"scoring the baselines: {'; '.join(names)}")
        scorer = executor.score_recipe
        scores = [baselines.score(p, scorer, journal, splits) for p in self.baselines]
        if randoms is not None:
            random_journal, policy = randoms
            trials = [t for t in random_journal.finished() if not t.outcome.failed]
            if trials:
                best, _, _, _ = self.choose(trials, executor, policy, echo)
                key = f"baseline:random:{best.number}"
                cached = journal.get_attr(key)
                if cached is None:
                    candidate = self.space.candidate(best.genome)
                    results = {split: executor.score(candidate, split) for split in splits}
                    name = f"random search (best of {len(trials)}: trial {best.number})"
                    cached = ModelScores.of(name, "random", results, len(trials)).to_dict()
                    journal.set_attr(key, cached)
                scores.append(ModelScores.from_dict(cached))
        return scores

    def _references(
        self,
        journal: Journal,
        executor: Executor,
        policy: FitnessPolicy,
        suites: dict[str, TaskSuite],
        best: TrialRecord,
        echo: Echo,
    ) -> list[ModelScores]:
        """Sources, uniform merge and best merge on both splits (cached in the study)."""
        cached = journal.get_attr("references")
        key = recipe_hash(self.space.to_recipe(best.genome))
        if cached and cached.get("best") == key:
            return [ModelScores.from_dict(d) for d in cached["scores"]]
        echo("scoring the sources, the uniform merge and the best merge on both splits")
        splits = [split for split in SPLITS if split in suites]
        references = [
            ModelScores.of(
                source_name(model),
                "source",
                policy.source_results.get(model) or executor.score_source(model),
                0,
            )
            for model in self.recipe.merge.referenced_models()
        ]
        for name, kind, candidate in self.space.references(best.genome):
            results = {split: executor.score(candidate, split) for split in splits}
            cost = len(journal.finished()) if kind == "best" else 0
            references.append(ModelScores.of(name, kind, results, cost))
        journal.set_attr("references", {"best": key, "scores": [r.to_dict() for r in references]})
        return references

    def _check_free_space(self) -> None:
        """Before the first trial: room for the best model at the end (as large as the largest
        source for a parameter-space merge; at most all sources together for a data-flow one)
        and the report, so that hours of search do not end in a full disk."""
        sizes = [source_bytes(model) for model in self.sources]
        needed = (max(sizes) if isinstance(self.space, ParameterSpace) else sum(sizes)) + 2**24
        free = shutil.disk_usage(self.out).free
        if free < needed:
            raise SearchError(
                f"{self.out}: the best model and report need about {needed / 2**30:.2f} GiB, "
                f"the disk has {free / 2**30:.2f} GiB free; free space or choose another --out"
            )

    def _write_model(self, genome: list[float], echo: Echo) -> None:
        target = self.out / "model"
        self.space.write_model(
            genome,
            target,
            device=self.recipe.device,
            seed=self.recipe.seed,
            allow_pickle=self.recipe.allow_pickle,
        )
        echo(f"wrote the best merge to {target}")

    def _settings(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "method": r.merge.merge_method,
            "genes": len(self.space),
            "optimizer": f"{r.optimizer.backend}:{r.optimizer.name}",
            "population": getattr(r.optimizer, "population", None) or "default",
            "budget": r.budget.model_dump(exclude_none=True),
            "fitness mode": r.fitness.mode.model_dump(exclude_defaults=True) or "full",
            "seed": r.seed,
            "device": r.device,
            "storage": redact(self.storage),
        }


def preflight(recipe: SearchRecipe) -> list[Planned]:
    """Everything a search refuses before it loads anything, in one place for a run and for
    `--dry-run`; returns the baselines it will score."""
    from evomerge.search.breeding import STRATEGIES

    check_optimizer(recipe.optimizer, len(recipe.fitness.tasks))
    check_mode(recipe.fitness.mode, recipe.executor)
    if recipe.optimizer.name in STRATEGIES:
        if not isinstance(recipe.space, SpaceSpec):
            raise SearchError(
                f"optimizer: {recipe.optimizer.name} breeds parameter-space genomes; use it "
                "with a parameter space (or CMA for data-flow spaces)"
            )
        if recipe.fitness.mode.type == "racing":
            raise SearchError(
                f"fitness.mode: {recipe.optimizer.name} compares every member on the same rows, "
                "which racing's early stops leave unscored; use full, minibatch or irt"
            )
        if recipe.optimizer.name == "natural_niches" and recipe.fitness.mode.type != "full":
            raise SearchError(
                "fitness.mode: natural_niches shares out every fitness row among its archive, "
                "so each member needs all of them; use mode full"
            )
    check_before_loading(recipe)
    if isinstance(recipe.space, DfsSpec | PsDfsSpec) and recipe.executor == "ray":
        raise SearchError("executor: data-flow searches run with the serial executor for now")
    return baselines.check(recipe)


def check_before_loading(recipe: SearchRecipe) -> None:
    """What a dry run and a real run refuse alike before a model loads: the device, model
    references that resolve to nothing, and space filters that match no tensor of a local
    config model (read from its safetensors headers)."""
    from evomerge.merge.compute import resolve_device
    from evomerge.merge.refs import check_reference
    from evomerge.merge.weights import WeightIndex

    resolve_device(recipe.device)
    merge = recipe.merge
    for model in merge.referenced_models():
        check_reference(model)
    filters = getattr(recipe.space, "filters", None)
    first = merge.base_model or (merge.models[0].model if merge.models else None)
    if filters and first and Path(first).is_dir():
        names = list(WeightIndex.read(Path(first)).tensors)
        for pattern in filters:
            if names and not any(pattern in name for name in names):
                raise SearchError(
                    f"space.filters: {pattern!r} is in no tensor name of {first} (names look "
                    f"like {names[len(names) // 2]}); fix the filter"
                )


def num_layers(recipe: SearchRecipe) -> int | None:
    """The layer count of the merge's config model, read without downloading anything."""
    merge = recipe.merge
    return layer_count(merge.base_model or merge.models[0].model, recipe.space.num_layers)  # type: ignore[index]


def layer_count(model: str, fallback: int | None) -> int | None:
    """A model's layer count from its config.json (a local folder, or the Hugging Face cache);
    `fallback` when the config is not on this machine."""
    from evomerge.merge import gguf
    from evomerge.merge.lora import split_lora
    from evomerge.merge.refs import ModelRef

    model = split_lora(model)[0]  # a LoRA reference has its base's layers
    if gguf.is_gguf(model):
        return gguf.layer_count(model) or fallback
    ref = ModelRef.parse(model)
    config = Path(ref.path) / "config.json"
    if not ref.is_local and ref.hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.hub_id, "config.json", revision=ref.revision)
        config = Path(cached) if isinstance(cached, str) else Path("/nonexistent")
    if config.is_file():
        data = json.loads(config.read_text())
        data = data.get("text_config", data)
        if isinstance(data.get("num_hidden_layers"), int):
            return data["num_hidden_layers"]
    if ref.is_local:
        raise SearchError(f"merge: {ref.path} has no config.json with num_hidden_layers")
    return fallback


def make_space(recipe: SearchRecipe) -> GeneSpace:
    """The recipe's search space, built without loading or downloading a model."""
    if isinstance(recipe.space, DfsSpec):
        from evomerge.search.dfs import DataFlowSpace

        refs = recipe.merge.referenced_models()
        counts = {ref: layer_count(ref, recipe.space.num_layers) for ref in refs}
        return DataFlowSpace(recipe.merge, recipe.space, counts)
    return ParameterSpace(recipe.merge, recipe.space, num_layers(recipe))


def source_name(model: str) -> str:
    """How reports call a source: its folder's name (`ps/model` for a stage's merge), a GGUF
    file's stem, `base+adapter` by both names, or the reference as written for a Hub model."""
    from evomerge.merge import gguf
    from evomerge.merge.lora import split_lora

    base, adapter = split_lora(model)
    if adapter is not None:
        return f"{source_name(base)}+{source_name(adapter)}"
    if gguf.is_gguf(model):
        return Path(model).stem
    path = Path(model)
    if not path.exists():
        return model
    return "/".join(path.parts[-2:]) if path.name == "model" else path.name


def _pareto(trials: list[TrialRecord], objectives: list[str]) -> list[int]:
    def dominated(a: TrialRecord) -> bool:
        va = [a.outcome.scores[o] for o in objectives]
        for b in trials:
            vb = [b.outcome.scores[o] for o in objectives]
            if all(x >= y for x, y in zip(vb, va, strict=True)) and vb != va:
                return True
        return False

    return [t.number for t in trials if not dominated(t)]


def fitness_cost(
    trials: list[TrialRecord],
    policy: FitnessPolicy,
    rescored: dict[int, dict],
    exact: dict[int, float | None],
) -> dict[str, Any]:
    """What the fitness cost, in rows, against a search that scores every row of every
    candidate; and the fitness each trial's estimate stands for, where it is known."""
    per_trial = policy.rows.count
    in_trials = sum(t.outcome.rows if t.outcome.rows is not None else per_trial for t in trials)
    full = per_trial * len(trials)
    return {
        "mode": policy.name,
        "fitness_rows": per_trial,
        "rows_scored": in_trials + policy.extra_rows,
        "rows_in_trials": in_trials,
        "rows_outside_trials": policy.extra_rows,  # re-scoring the best estimates
        "rows_full_search": full,
        "stopped": sum(t.outcome.stopped for t in trials),
        "rescored": sorted(rescored),
        "exact": {str(n): v for n, v in sorted(exact.items())},
    }


def summary_json(summary: SearchSummary) -> dict[str, Any]:
    """`summary.json`: the search in a few numbers."""
    best = summary.best
    assert best is not None
    cost = summary.cost
    ref = next((r for r in summary.references if r.kind == "best"), None)
    return {
        "title": summary.title,
        "evaluations": len(summary.trials),
        "failed": sum(t.outcome.failed for t in summary.trials),
        "stopped": cost["stopped"],
        "mode": cost["mode"],
        "rows_scored": cost["rows_scored"],
        "rows_full_search": cost["rows_full_search"],
        "rows_share": cost["rows_scored"] / cost["rows_full_search"],
        "wall_seconds": round(cost["wall_seconds"], 3),
        "search_seconds": round(cost["search_seconds"], 3),
        "best": {
            "trial": best.number,
            "fitness": cost["exact"].get(str(best.number), best.outcome.fitness),
            "estimate": best.outcome.fitness,
            "heldout": ref.heldout_total if ref else None,
            "heldout_stderr": ref.heldout_total_stderr if ref else None,
        },
        "references": [
            {
                "name": r.name,
                "kind": r.kind,
                "evaluations": r.cost,
                "heldout": r.heldout_total,
                "heldout_stderr": r.heldout_total_stderr,
            }
            for r in summary.references
        ],
    }


def _best_recipe_text(
    recipe: Recipe, trial: TrialRecord, search: Search, fitness: float | None = None
) -> str:
    fitness = trial.outcome.fitness if fitness is None else fitness
    header = (
        f"# Found by evomerge search ({search.title}): trial {trial.number}, "
        f"fitness {fitness:.4f}.\n"
        f"# Rebuild: evomerge merge best_recipe.yaml OUT --seed {search.recipe.seed}"
        " (or mergekit-yaml)\n"
    )
    return header + recipe.to_yaml(mark_local=True)


def _set_threads(recipe: SearchRecipe) -> None:
    from evomerge.merge.compute import resolve_device

    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    elif resolve_device(recipe.device).type == "cpu":
        torch.set_num_threads(1)  # small models on a shared CPU: more threads were slower
