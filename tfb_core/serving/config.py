"""What an engine is configured with: :class:`EngineConfig`, its checks and its defaults.

One frozen dataclass per served adapter (the model and adapter, task, sigma or how to search it,
N, seed, the calibration's settings), validated in ``__post_init__``; :meth:`EngineConfig.with_defaults`
fills in the embedded default (the small real model and the bundled SST-2 demo adapter) and what
an adapter folder carries beside its weights (``anchor.jsonl``, ``calibration.jsonl``). The
algorithm's own defaults (posterior, search) are :mod:`tfb_core.config`'s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tfb_core.config import DEFAULT_MODEL, ModelConfig, PosteriorConfig, SearchConfig
from tfb_core.data.published import parse as parse_published
from tfb_core.data.tasks import ALIASES, GENERATION
from tfb_core.decide.conformal import SCORES
from tfb_core.decide.generation_risk import RISK_SCORES
from tfb_core.search.strategy import default_search, reachable_range

#: The bundled demo adapter (an MLE LoRA for SST-2 on the embedded default model).
DEMO_ADAPTER = Path(__file__).parent.parent / "adapters" / "sst2-mle"
#: what an adapter folder may carry beside its weights: its anchor set and its calibration set
ANCHOR_FILE = "anchor.jsonl"
CALIBRATION_FILE = "calibration.jsonl"
DEMO_ANCHOR = DEMO_ADAPTER / ANCHOR_FILE
#: the 272 labelled SST-2 sentences neither the adapter nor the sigma search saw (its held-out test
#: part, scripts/demo_calibration.py): the demo's calibration set for prediction sets and abstention
DEMO_CALIBRATION = DEMO_ADAPTER / CALIBRATION_FILE
#: the bundled generative demo adapter (an MLE LoRA for two-digit arithmetic on the embedded default
#: model, scripts/train_generative.py): served as "arith-mle" beside the SST-2 demo by default
DEMO_GENERATIVE_ADAPTER = Path(__file__).parent.parent / "adapters" / "arith-mle"
#: what an adapter folder's own training record may say (``"kind": "generation"``: a generative adapter)
TRAIN_CONFIG_FILE = "train_config.json"
GENERATION_TASK = GENERATION.name


class ConfigError(ValueError):
    """A bad value of an :class:`EngineConfig`; ``param`` names its field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineConfig:
    """Everything :class:`~tfb_core.serving.engine.TFBEngine` needs. ``sigma=None``: from the cache or a search on ``anchor``.

    ``task="generation"`` is a generative adapter (no labels: it answers the completion routes; its
    sigma is searched on its own greedy answers to the anchor prompts, :mod:`tfb_core.search.generation`).
    ``search=None``: the default search of the adapter's kind (:func:`tfb_core.search.default_search`:
    :class:`~tfb_core.config.SearchConfig`'s for classification, :data:`~tfb_core.search.strategy.GENERATION_SEARCH`
    for generation), set by :meth:`with_defaults`.

    ``published`` (``method/dataset/seed``) names one of the published TFB adapters: it sets the
    adapter, the base model (unless another is given, e.g. a local copy) and the task, and without
    ``anchor`` the search runs on the reference anchor set of its data set.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    published: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    sigma: float | None = None
    anchor: str | None = None
    search: SearchConfig | None = None
    d_floor: float = 1e-6
    n_samples: int = 10
    seed: int = 0
    max_rows: int = 64
    #: fixed cost of a forward in prompt tokens, and most tokens per forward, for planning forwards
    #: by length (None: by device)
    forward_overhead_tokens: float | None = None
    max_batch_tokens: float | None = None
    #: labelled JSON Lines for conformal sets and abstention (None: a split of a labelled anchor)
    calibration: str | None = None
    #: fraction of a labelled anchor held out from the sigma search for calibration when no
    #: calibration file is given and sigma is searched (0, the default: sigma is searched on all of
    #: the anchor, as the reference does, and there is no calibration unless a file is given)
    calibration_split: float = 0.0
    conformal_score: str = "lac"
    conformal_mondrian: bool = False
    #: prediction sets from online quantile tracking (:mod:`tfb_core.decide.online`), moved by the
    #: labels of /feedback: long-run coverage under any shift, in place of split conformal's
    #: marginal coverage on exchangeable data; its step on the score scale
    conformal_online: bool = False
    online_eta: float = 0.05
    risk_delta: float = 0.1
    #: a generative adapter's anchor answers: the sigma = 0 model's greedy answers of at most this many tokens
    #: (and its max_risk calibration's answers)
    anchor_max_tokens: int = 32
    #: a generative adapter's max_risk score (:data:`tfb_core.decide.generation_risk.RISK_SCORES`; None:
    #: :data:`~tfb_core.decide.generation_risk.DEFAULT_RISK_SCORE`, measured)
    risk_score: str | None = None

    @property
    def generative(self) -> bool:
        """A generative adapter (``task="generation"``, or its folder's train_config.json says so)."""
        return generation_task(self.task)

    def __post_init__(self) -> None:
        if self.published is not None:
            spec = parse_published(self.published)  # PublishedError (a ValueError) listing the valid names
            if self.model.adapter is not None and (self.model.adapter, self.model.adapter_subfolder) != (
                    spec.repo, spec.subfolder):
                raise ValueError(f"published adapter {spec.name!r} and adapter {self.model.adapter!r} both given: "
                                 "name one (--published, or --adapter with --adapter-subfolder)")
            if self.task is not None and self.task.lower() not in (spec.task, spec.dataset.lower()):
                raise ValueError(f"published adapter {spec.name!r} is for task {spec.task!r}, got task {self.task!r}")
        if not 0.0 <= self.calibration_split < 1.0:
            raise ValueError(f"calibration_split must be in [0, 1), got {self.calibration_split}")
        if self.conformal_score not in SCORES:
            raise ValueError(f"conformal_score must be one of {SCORES}, got {self.conformal_score!r}")
        if not (0.0 < self.online_eta <= 1.0):
            raise ValueError(f"online_eta must be in (0, 1], got {self.online_eta}")
        if not 0.0 < self.risk_delta < 1.0:
            raise ValueError(f"risk_delta must be in (0, 1), got {self.risk_delta}")
        if self.sigma is not None:
            PosteriorConfig(sigma=self.sigma, d_floor=self.d_floor)  # validates
            # the search never returns more (its bracket, expanded): a larger fixed sigma drowns the
            # adapter in noise (sigma 1e6 answers noise, MI about ln 2) and is a typo, not a choice
            search = self.search or default_search(self.generative)
            highest = reachable_range(search)[1]
            if self.sigma > highest:
                raise ConfigError(f"sigma {self.sigma:g} is above {highest:.3g}, the most a sigma search reaches "
                                  f"(high {search.high:g}, expanded {search.max_expansions} times, method "
                                  f"{search.method}): give a smaller sigma, or raise the search's high", "sigma")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.forward_overhead_tokens is not None and not self.forward_overhead_tokens >= 0:
            raise ValueError(f"forward_overhead_tokens must be >= 0, got {self.forward_overhead_tokens}")
        if self.max_batch_tokens is not None and not self.max_batch_tokens >= 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.anchor_max_tokens < 1:
            raise ValueError(f"anchor_max_tokens must be >= 1, got {self.anchor_max_tokens}")
        if self.risk_score is not None and self.risk_score not in RISK_SCORES:
            raise ConfigError(f"risk_score must be one of {sorted(RISK_SCORES)}, got {self.risk_score!r}", "risk_score")
        if self.generative and self.labels is not None:
            raise ValueError(f"a generative adapter (task 'generation') has no labels, got {list(self.labels)}")

    def with_defaults(self) -> EngineConfig:
        """Fill in the embedded default: the small real model, the demo adapter, its task and anchor.

        An adapter folder may carry its own ``anchor.jsonl`` and ``calibration.jsonl`` beside its
        weights: they are the defaults of its anchor (when sigma is not fixed) and calibration,
        wherever the folder is named from (the demo adapter's, by the default or by its path, also
        set the task, sst2); a folder whose ``train_config.json`` says ``"kind": "generation"`` is a
        generative adapter unless a task is given. The search, unless given, is the kind's default, seeded
        with the posterior ``seed``."""
        changes: dict[str, Any] = {}
        model = self.model
        if self.published is not None:
            spec = parse_published(self.published)
            base = spec.base_model if model.model == DEFAULT_MODEL else model.model
            model = ModelConfig(**{**asdict(model), "model": base, "adapter": spec.repo,
                                   "adapter_subfolder": spec.subfolder})
            changes.update(model=model, task=spec.task)
        if model.adapter is None and model.model == DEFAULT_MODEL:
            model = ModelConfig(**{**asdict(model), "adapter": str(DEMO_ADAPTER)})
            changes["model"] = model
        folder = local_adapter_folder(model)
        if folder is not None:
            if folder.resolve() == DEMO_ADAPTER.resolve() and self.task is None and self.labels is None:
                changes["task"] = "sst2"
            elif self.task is None and self.labels is None and (kind := folder_task(model)) is not None:
                changes["task"] = kind
            if self.anchor is None and self.sigma is None and (folder / ANCHOR_FILE).is_file():
                changes["anchor"] = str(folder / ANCHOR_FILE)
            # a generative adapter's: its labelled questions for max_risk (tfb_core.serving.risk)
            if self.calibration is None and self.calibration_split == 0.0 and (folder / CALIBRATION_FILE).is_file():
                changes["calibration"] = str(folder / CALIBRATION_FILE)
        cfg = EngineConfig(**{**self.__dict__, **changes}) if changes else self
        if cfg.search is None:  # its fixed noise's seed is the posterior seed, as TFB_SEED and --seed set both
            cfg = EngineConfig(**{**cfg.__dict__, "search": replace(default_search(cfg.generative), seed=cfg.seed)})
        return cfg

    def with_search(self, **changes: Any) -> EngineConfig:
        """This config with its search (given, else the default of its kind that :meth:`with_defaults`
        sets, seeded with the posterior seed) changed by ``changes`` (SearchConfig's fields): what
        ``--tolerance`` on the CLI and ``search={...}`` in the library mean, so that a generative
        adapter's partial search keeps the generative default's criterion and tolerance."""
        kind = self.search or self.with_defaults().search
        assert kind is not None
        return EngineConfig(**{**self.__dict__, "search": replace(kind, **changes)})


def local_adapter_folder(model: ModelConfig) -> Path | None:
    """The local folder of ``model``'s adapter (its subfolder), or None (a hub id, none)."""
    if not model.adapter:
        return None
    folder = Path(model.adapter).expanduser() / (model.adapter_subfolder or "")
    return folder if folder.is_dir() else None


def generation_task(task: str | None) -> bool:
    """Whether a task name names a generative adapter's task (``generation``, or an alias of it)."""
    return task is not None and ALIASES.get(task.lower(), task.lower()) == GENERATION_TASK


def folder_task(model: ModelConfig) -> str | None:
    """The task an adapter's local folder says it is for (``generation``, from its train_config.json),
    or None (no folder, or it says nothing: its task is the settings')."""
    folder = local_adapter_folder(model)
    return GENERATION_TASK if folder is not None and adapter_kind(folder) == GENERATION_TASK else None


def adapter_kind(folder: Path) -> str | None:
    """What an adapter folder's ``train_config.json`` says it is (``"kind"``), or None (no such file,
    not JSON, no kind: a folder from elsewhere is described by its settings, not guessed at)."""
    try:
        kind = json.loads((folder / TRAIN_CONFIG_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None
