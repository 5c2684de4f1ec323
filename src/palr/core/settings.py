"""Every command's settings: one typed dataclass per command, the single definition of its options.

**Adding an option = adding a field** to the command's dataclass below::

    epochs: float = field(default=3.0, metadata=opt("Training epochs."))

From that one field come the flag (``--epochs``; other spellings with ``opt("...", "-e", "--epochs")``), its
``--help`` line and default, the ``--config FILE`` key (``epochs``, YAML/TOML/JSON; flags override the file),
the type check (a wrong type or unknown key is one line naming the valid ones, exit 2), and the copy saved
as ``args.json`` in the run directory (which ``--config`` reads back). Check values in ``__post_init__`` by
raising :class:`ConfigError`. A nested dataclass (``DataSpec``, ``ExampleConfig``, ``MiniConfig``) is
flattened into the command's flags, its fields' names prefixed with ``opt(prefix=...)`` when given. The
mechanism is in :mod:`palr.core.options` and :mod:`palr.cli.flags`; the commands are wired in :mod:`palr.cli.main`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from palr.core.errors import ConfigError, InputError
from palr.core.options import opt

TASKS = ("recommend", "recommend_retrieval", "verbalizer")  # fine-tuning tasks (palr.train.examples)
LLM_HELP = ("Rank with this LLM: hf:PATH_OR_ID, openai:MODEL@URL, mini:DIR. With a retriever run: zero-shot "
            "ranking of its candidates.")
TRUST_HELP = ("Use the remote LLM endpoint the run's ranking.json names (sent without credentials); by default a "
              "run file cannot make palr send data anywhere: name an endpoint with --llm instead.")
FALLBACK_HELP = ("Keep the retriever's order when the LLM server cannot be reached (counted), instead of stopping.")
# the retriever registry's names (palr.retrieval.base.REGISTRY; importing it here would be circular: a test
# checks the two agree)
RETRIEVER_HELP = "popularity, itemknn, sasrec, als, bpr, text"
RUN_DATA_HELP = ("Raw data given again: checked against the run's data snapshot, which the run reads (no raw "
                 "file needed).")
DATASET_HELP = "ml-100k, ml-1m, ml-latest-small, amazon-<category>, or csv:PATH (CSV or Parquet)"


def _positive(**values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _fraction(**values: float) -> None:
    for name, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")


# ---------------------------------------------------------------------------- data
@dataclass
class DataSpec:
    """Which data set and, for ``csv:PATH``, which columns hold what; saved in every run (paths absolute)."""

    dataset: str = field(default="", metadata=opt(DATASET_HELP, "-d", "--dataset"))
    data_dir: Path | None = field(default=None, metadata=opt(
        "Data directory (default: $PALR_DATA_DIR, else ~/.cache/palr/data)."))
    user_col: str = field(default="user", metadata=opt("csv:PATH: the user id column."))
    item_col: str = field(default="item", metadata=opt("csv:PATH: the item id column."))
    time_col: str = field(default="timestamp", metadata=opt(
        "csv:PATH: the time column, epoch seconds or ISO-8601 ('' = the file is in order)."))
    items_file: Path | None = field(default=None, metadata=opt(
        "csv:PATH: item file (CSV or Parquet): id, title, tags and attribute columns."))
    title_col: str = field(default="title", metadata=opt("Items file: the title column."))
    tags_col: str = field(default="", metadata=opt(
        "Items file: the tags column, 'a|b' (default: genres or categories when present)."))

    def resolved(self) -> DataSpec:
        """Paths made absolute (a run then works from any directory)."""
        ds = self.dataset
        for pre in ("csv:", "file:"):
            if ds.startswith(pre):
                ds = "csv:" + str(Path(ds[len(pre):]).expanduser().resolve())
        return replace(self, dataset=ds, data_dir=self.data_dir.expanduser().resolve() if self.data_dir else None,
                       items_file=self.items_file.expanduser().resolve() if self.items_file else None)

    def require(self) -> None:
        if not self.dataset:
            raise ConfigError(f"missing --dataset ({DATASET_HELP})")

    @property
    def is_file(self) -> bool:
        return self.dataset.startswith(("csv:", "file:"))


@dataclass
class DataStatsConfig:
    """Users, items and interactions after the canonical preprocessing."""

    data: DataSpec = field(default_factory=DataSpec)
    json: bool = field(default=False, metadata=opt("Print a JSON object."))

    def __post_init__(self) -> None:
        self.data.require()


@dataclass
class DataDownloadConfig:
    """Download a data set from its original source (GroupLens, UCSD) and check sha256 sums."""

    name: str = field(metadata=opt("ml-100k, ml-1m, ml-latest-small or amazon-<category>", argument=True))
    data_dir: Path | None = field(default=None, metadata=opt("Data directory (default: $PALR_DATA_DIR)."))
    timeout: float = field(default=10.0, metadata=opt("Seconds before giving up on a connection."))


# ---------------------------------------------------------------------------- retrieval
@dataclass
class TrainConfig:
    """Train a retriever and save it as a run directory."""

    out: Path = field(metadata=opt("Run directory to create.", "-o", "--out"))
    data: DataSpec = field(default_factory=DataSpec)
    retriever: str = field(default="sasrec", metadata=opt(
        RETRIEVER_HELP, "-r", "--retriever"))
    params: dict[str, Any] = field(default_factory=dict, metadata=opt(
        "Retriever hyper-parameter key=value (repeatable).", "-p", "--param"))
    seed: int = field(default=0, metadata=opt("Random seed."))
    overwrite: bool = field(default=False, metadata=opt("Replace a run in --out trained with other settings."))

    def __post_init__(self) -> None:
        self.data.require()  # --param is checked against the retriever's types by palr.retrieval.base.check_settings


@dataclass
class TuneConfig:
    """Search a retriever's hyper-parameters (Optuna) on validation NDCG@10; saves the best run and the trials."""

    out: Path = field(metadata=opt("Directory for trials.csv/json, study.json and best/.", "-o", "--out"))
    data: DataSpec = field(default_factory=DataSpec)
    retriever: str = field(default="sasrec", metadata=opt(
        RETRIEVER_HELP, "-r", "--retriever"))
    budget: float = field(default=600.0, metadata=opt("Wall-clock seconds for the whole search."))
    trials: int | None = field(default=None, metadata=opt("At most this many trials (default: until the budget)."))
    space: Path | None = field(default=None, metadata=opt("Search space file (JSON/TOML) merged over the default."))
    params: dict[str, Any] = field(default_factory=dict, metadata=opt(
        "Fix a hyper-parameter key=value in every trial.", "-p", "--param"))
    pruner: Literal["median", "none"] = field(default="median", metadata=opt(
        "median (prune on the validation curve) or none."))
    seed: int = field(default=0, metadata=opt("Seed of the sampler and of every trial."))

    def __post_init__(self) -> None:
        self.data.require()  # --param is checked against the retriever's types by palr.retrieval.base.check_settings
        _positive(budget=self.budget)


@dataclass
class EvaluateConfig:
    """Full-ranking leave-one-out evaluation on valid and test; writes results.json and predictions; every model
    is compared with the baseline on the same users (paired-bootstrap 95% CIs, p-value).

    With --llm, --candidates N is the number of retriever candidates the LLM ranks (default 20).
    Under `torchrun`/`accelerate launch` the users are split across the processes and gathered (same figures)."""

    data: DataSpec = field(default_factory=DataSpec)
    retriever: list[str] = field(default_factory=list, metadata=opt(
        "Retriever(s) fitted on the train split.", "-r", "--retriever"))
    params: dict[str, Any] = field(default_factory=dict, metadata=opt(
        "Hyper-parameter key=value for the retrievers that take it (repeatable).", "-p", "--param"))
    run: Path | None = field(default=None, metadata=opt("A saved run directory (no retraining).",
                                                        also_positional=True))
    out: Path = field(default=Path("results.json"), metadata=opt("results.json path.", "-o", "--out"))
    predictions: Path | None = field(default=None, metadata=opt("Test predictions JSONL."))
    llm_predictions: Path | None = field(default=None, metadata=opt(
        "(PALR runs, --llm) the LLM ranker's order alone over the same candidates (JSONL like --predictions), with "
        "its row in the table, also when the run's ranker does not use the LLM."))
    retriever_predictions: Path | None = field(default=None, metadata=opt(
        "(PALR runs) the retriever's own predictions."))
    candidates: int = field(default=0, metadata=opt("Also write each test user's top-N and its recall."))
    candidates_out: Path | None = field(default=None, metadata=opt("Where to write candidates JSONL."))
    seed: int = field(default=0, metadata=opt(
        "Random seed for retrievers fitted here, for the order of ties and for --users."))
    seeds: list[int] | None = field(default=None, metadata=opt(
        "Comma-separated seeds (e.g. 0,1,2): fit and evaluate once per seed; report mean ± sd."))
    per_user: Path | None = field(default=None, metadata=opt("Per-user test metrics CSV (every model)."))
    baseline: str | None = field(default=None, metadata=opt(
        "The model the others are compared with (default: the first --retriever)."))
    llm: str | None = field(default=None, metadata=opt(LLM_HELP))
    allow_fallback: bool = field(default=False, metadata=opt(FALLBACK_HELP))
    trust_run_llm: bool = field(default=False, metadata=opt(TRUST_HELP))
    users: int = field(default=0, metadata=opt("With a PALR run or --llm: a seeded sample of test users (0 = all)."))

    def __post_init__(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"--seeds expects distinct comma-separated integers, got {self.seeds}")
        if self.run is not None and self.seeds is not None:
            raise ConfigError("--seeds refits the retrievers: give --dataset and --retriever, not --run")
        if self.run is None:
            if not self.data.dataset or not self.retriever:
                raise ConfigError("give --run DIR, or --dataset NAME with --retriever NAME")
        elif self.params:
            raise ConfigError("--param applies to retrievers fitted here (--dataset/--retriever), not to --run")
        if self.llm_predictions is not None and self.run is None:
            raise ConfigError("--llm-predictions needs --run (a PALR run, or a retriever run with --llm)")


# ---------------------------------------------------------------------------- LLM layer
@dataclass
class MiniConfig:
    """The embedded mini LLaMA: one definition for `palr model create-mini` and `palr finetune`."""

    vocab: int = field(default=2048, metadata=opt("BPE vocabulary (item and label tokens come on top).",
                                                  "--vocab", "--vocab-size"))
    layers: int = field(default=2, metadata=opt("Transformer layers."))
    dim: int = field(default=64, metadata=opt("Hidden size.", "--dim", "--width"))
    heads: int = field(default=4, metadata=opt("Attention heads."))

    def __post_init__(self) -> None:
        _positive(vocab=self.vocab, layers=self.layers, dim=self.dim, heads=self.heads)
        if self.dim % self.heads:
            raise ConfigError(f"mini model: hidden size {self.dim} is not a multiple of {self.heads} heads")


@dataclass
class ProfileConfig:
    """PALR step 1: a user's profile as short keywords (attributes, or written by an LLM)."""

    data: DataSpec = field(default_factory=DataSpec)
    user: str | None = field(default=None, metadata=opt("Original user id.", "-u", "--user"))
    all: bool = field(default=False, metadata=opt("Profile every user (progress bar)."))
    llm: str | None = field(default=None, metadata=opt(
        "mini:DIR, hf:ID_OR_PATH, openai:MODEL@URL; default: attribute profile, no LLM."))
    stage: Literal["all", "valid", "test"] = field(default="all", metadata=opt(
        "History used: all, valid (before the validation item), test."))
    cache: Path | None = field(default=None, metadata=opt("SQLite profile cache file."))
    out: Path | None = field(default=None, metadata=opt("Write JSON lines here.", "-o", "--out"))
    json: bool = field(default=False, metadata=opt("Print JSON."))
    allow_fallback: bool = field(default=False, metadata=opt(
        "Use attribute profiles when the LLM server cannot be reached, instead of stopping."))

    def __post_init__(self) -> None:
        self.data.require()
        if self.all == (self.user is not None):
            raise ConfigError("give exactly one of --user ID or --all")


@dataclass
class CreateMiniConfig:
    """Create the embedded mini LLaMA (random weights) with a tokenizer trained on the catalogue."""

    out: Path = field(metadata=opt("Model directory to write.", "-o", "--out"))
    data: DataSpec = field(default_factory=DataSpec)
    mini: MiniConfig = field(default_factory=MiniConfig)
    item_tokens: bool = field(default=True, metadata=opt("One added token per item (<i123>)."))
    label_tokens: int = field(default=64, metadata=opt("Verbalizer label tokens <c0>..<cN-1>."))
    seed: int = field(default=0, metadata=opt("Random seed."))

    def __post_init__(self) -> None:
        self.data.require()


@dataclass
class ModelImportConfig:
    """Import a packaged pretrained model as a Hugging Face directory (needs the matching extra)."""

    name: str = field(metadata=opt("gemma-3-270m", argument=True))
    out: Path = field(metadata=opt("Model directory to write.", "-o", "--out"))


@dataclass
class ModelExportConfig:
    """The run's ranking LLM as one model directory (LoRA merged into its base) for vLLM or `palr model serve`."""

    run: Path = field(metadata=opt("A PALR run (palr finetune).", also_positional=True))
    out: Path = field(metadata=opt("Model directory to write.", "-o", "--out"))


@dataclass
class ModelServeConfig:
    """Serve an LLM with an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""

    spec: str = field(metadata=opt("mini:DIR, hf:ID_OR_PATH or a model directory", argument=True))
    host: str = field(default="127.0.0.1", metadata=opt("Interface to listen on."))
    port: int = field(default=8000, metadata=opt("TCP port."))
    name: str = field(default="palr", metadata=opt("Model name the API reports."))


# ---------------------------------------------------------------------------- PALR fine-tuning
@dataclass
class ExampleConfig:
    """The paper's choices as options (PALR: 20% of users, history of 20, item swap augmentation)."""

    user_fraction: float = field(default=1.0, metadata=opt("Share of users used for training (paper: 0.2)."))
    positions_per_user: int = field(default=10, metadata=opt(
        "Training prefixes per user (from the end of train).", "--positions"))
    history_len: int = field(default=20, metadata=opt("History items in a prompt (paper: 20)."))
    n_candidates: int = field(default=50, metadata=opt("Candidates per prompt (retriever top-K).", "--candidates"))
    n_targets: int = field(default=1, metadata=opt("Future items per example (Recommend tasks: up to 10)."))
    genre_negatives: int = field(default=5, metadata=opt("Same-genre/category items among the candidates."))
    cooc_negatives: int = field(default=5, metadata=opt("Items co-occurring with the target in training."))
    swap_prob: float = field(default=0.0, metadata=opt("Item-swap augmentation probability (paper's idea)."))
    source: Literal["valid", "prefixes", "both"] = field(default="prefixes", metadata=opt(
        "Training examples: prefixes (training-sequence prefixes; chosen on held-out validation users, issue 11), "
        "valid (genuine candidates of validation users), both. A held-out share of validation users never trains."))
    lists: Literal["hard", "retriever"] = field(default="hard", metadata=opt(
        "Prefix examples' candidate lists: hard (targets + same-genre/co-occurring negatives + retriever top-K, "
        "shuffled) or retriever (the retriever's own top-K for the prefix in its order, as test lists are; prefixes "
        "whose target it misses are dropped)."))
    list_noise: float = field(default=0.0, metadata=opt(
        "Retriever lists of training prefixes: Gumbel noise (times each row's score std) added to the retriever's "
        "scores first, so lists of prefixes it was fitted on are as uncertain as test lists (0: none)."))
    evidence: Literal["none", "rank"] = field(default="none", metadata=opt(
        "Candidate evidence in token-style prompts: none, or rank (candidates in the retriever's order, each after "
        "a token of its retriever-rank bucket, so the LLM can learn the retriever's prior and add to it)."))
    seed: int = field(default=0, metadata=opt("", internal=True))  # set from FinetuneConfig.seed

    def __post_init__(self) -> None:
        _fraction(swap_prob=self.swap_prob)
        if self.list_noise < 0:
            raise ConfigError(f"--list-noise must be >= 0, got {self.list_noise}")
        if not 0.0 < self.user_fraction <= 1.0:
            raise ConfigError(f"--user-fraction must be in (0, 1], got {self.user_fraction}")
        _positive(positions=self.positions_per_user, history_len=self.history_len, candidates=self.n_candidates,
                  n_targets=self.n_targets)


@dataclass
class FinetuneConfig:
    """Every knob of the fine-tuning job (saved in the run's config.json)."""

    base_model: str = field(default="mini", metadata=opt("mini, or a local path / HF id of a causal LM."))
    lora: tuple[int, int] = field(default=(0, 16), metadata=opt(
        "LoRA rank,alpha for pretrained models (rank 0: 8).", metavar="R,ALPHA"))
    style: Literal["", "tokens", "text"] = field(default="", metadata=opt(
        "Candidate labels: tokens (mini) or text; empty: decided by the base model."))
    tasks: tuple[str, ...] = field(default=("verbalizer",), metadata=opt(
        "Comma-separated: verbalizer, recommend_retrieval, recommend."))
    epochs: float = field(default=3.0, metadata=opt("Training epochs."))
    lr: float = field(default=0.0, metadata=opt("Learning rate (0: 2e-3 mini, 2e-4 LoRA)."))
    batch_size: int = field(default=32, metadata=opt("Examples per step (per device)."))
    grad_accum: int = field(default=1, metadata=opt("Gradient accumulation steps."))
    weight_decay: float = field(default=0.01, metadata=opt("AdamW weight decay."))
    warmup_ratio: float = field(default=0.05, metadata=opt("Share of the training steps that warm up the cosine schedule, in [0, 1)."))
    listwise_weight: float = field(default=1.0, metadata=opt("Weight of the listwise loss over candidates."))
    valid_users: int = field(default=1000, metadata=opt("Validation users ranked after each epoch."))
    weight_users: int = field(default=5000, metadata=opt("Validation users on which the fusion weight is chosen."))
    max_length: int = field(default=1024, metadata=opt("Longest tokenised record."))
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    mini: MiniConfig = field(default_factory=MiniConfig, metadata=opt("", prefix="mini_"))
    init_from_retriever: bool = field(default=True, metadata=opt(
        "Mini: item token embeddings start from --item-init (off: random)."))
    item_init: Literal["hybrid", "retriever", "text", "none"] = field(default="retriever", metadata=opt(
        "Mini item tokens start from: retriever (its ID embeddings), hybrid (ID + text embeddings), text, none."))
    holdout: float = field(default=0.2, metadata=opt(
        "Share of validation users held out for choices (epoch, fusion, feature ranker)."))
    feature_ranker: bool = field(default=True, metadata=opt(
        "Fuse the LLM with the feature ranker (weight chosen on held-out validation users).", "--features"))
    text_encoder: Literal["auto", "minilm", "tfidf"] = field(default="auto", metadata=opt(
        "Item text embeddings (feature ranker, hybrid init): auto (MiniLM if palr[text] is installed, else "
        "TF-IDF), minilm, tfidf."))
    sources: str = field(default="", metadata=opt(
        "Candidates merged from several retrievers, e.g. itemknn:10,popularity:5 (text:N with palr[text]): each "
        "source adds that many new items, taken out of --candidates; every source's score and rank become ranker "
        "features. Empty: the retriever's top-K alone."))
    stacked: bool = field(default=True, metadata=opt(
        "Also fit the stacked ranker (the LLM's candidate scores as features of the trees, with its twin without "
        "them); it ranks when held-out validation users prefer it."))
    pretrain_epochs: int = field(default=3, metadata=opt("Mini: next-item pretraining epochs first."))
    profiles: bool = field(default=True, metadata=opt("Put the user profile in prompts."))
    profiler: str = field(default="attributes", metadata=opt(
        "Profiles in prompts: attributes, or llm:SPEC (written once by that LLM, cached in the run)."))
    seed: int = field(default=0, metadata=opt("Random seed."))

    def __post_init__(self) -> None:
        _fraction(holdout=self.holdout)
        self.tasks = tuple(self.tasks)
        self.lora = (int(self.lora[0]), int(self.lora[1]))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"--tasks: unknown task(s) {bad}; valid: {', '.join(TASKS)}")
        if self.lora[0] < 0 or self.lora[1] <= 0:
            raise ConfigError(f"--lora: rank must be >= 0 and alpha > 0, got {self.lora[0]},{self.lora[1]}")
        _positive(epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
                  max_length=self.max_length)
        if self.lr < 0:
            raise ConfigError(f"--lr must be >= 0, got {self.lr}")
        self.examples.seed = self.seed

    @property
    def lora_r(self) -> int:
        return self.lora[0]

    @property
    def lora_alpha(self) -> int:
        return self.lora[1]

    def resolved(self) -> FinetuneConfig:
        """Defaults that depend on the base model filled in (style, learning rate, LoRA rank)."""
        mini = self.base_model == "mini"
        return replace(self, style=self.style or ("tokens" if mini else "text"), lr=self.lr or (2e-3 if mini else 2e-4),
                       lora=(self.lora_r if (self.lora_r or mini) else 8, self.lora_alpha))


@dataclass
class FinetuneCommand:
    """Instruction fine-tuning of the ranking LLM over a retriever run (full for mini, LoRA otherwise);
    with --ranker features, the gradient-boosted feature re-ranker instead.

    Runs data-parallel under `torchrun --nproc_per_node N -m palr.cli finetune RUN ...` or `accelerate launch`."""

    run: Path = field(metadata=opt("A retriever run (palr train).", also_positional=True))
    out: Path = field(metadata=opt("PALR run directory to create.", "-o", "--out"))
    ranker: Literal["llm", "features"] = field(default="llm", metadata=opt(
        "llm (PALR's LLM ranker) or features (the LightGBM feature re-ranker, trained on validation candidates)."))
    train: FinetuneConfig = field(default_factory=FinetuneConfig)
    data_dir: Path | None = field(default=None, metadata=opt(RUN_DATA_HELP))
    overwrite: bool = field(default=False, metadata=opt(
        "Start afresh when --out holds a run (or checkpoints) made with other settings."))

    def __post_init__(self) -> None:
        if self.run.expanduser().resolve() == self.out.expanduser().resolve():
            raise ConfigError(f"--out {self.out} is the retriever run itself; choose another directory")


# ---------------------------------------------------------------------------- using a PALR run
@dataclass
class RecommendConfig:
    """Recommend for a known user, a given history of ids, or of titles (one of them): profile, ranked items,
    explanations."""

    run: Path = field(metadata=opt("A PALR run (palr finetune), or a retriever run with --llm.", also_positional=True))
    user: str | None = field(default=None, metadata=opt("Original user id.", "-u", "--user"))
    history: list[str] | None = field(default=None, metadata=opt("Comma-separated original item ids."))
    history_titles: str | None = field(default=None, metadata=opt("Titles separated by '|', matched fuzzily."))
    llm: str | None = field(default=None, metadata=opt(LLM_HELP))
    allow_fallback: bool = field(default=False, metadata=opt(FALLBACK_HELP))
    trust_run_llm: bool = field(default=False, metadata=opt(TRUST_HELP))
    k: int = field(default=10, metadata=opt("How many items (1 to the run's candidate count).", "--k", "-k"))
    explain: bool = field(default=False, metadata=opt("One sentence per item."))
    llm_explanations: bool = field(default=False, metadata=opt(
        "With --explain: the LLM writes each sentence (checked; template otherwise)."))
    mode: Literal["verbalizer", "generative"] | None = field(default=None, metadata=opt(
        "verbalizer or generative (default: the run's)."))
    json: bool = field(default=False, metadata=opt("Print JSON."))
    data_dir: Path | None = field(default=None, metadata=opt(RUN_DATA_HELP))

    def __post_init__(self) -> None:

        _positive(k=self.k)
        given = sum(x is not None for x in (self.user, self.history, self.history_titles))
        if given != 1:
            raise InputError("give --user ID, --history ID,ID,... or --history-titles 'TITLE|TITLE'"
                             + (" (not both)" if given else ""))


@dataclass
class ServiceConfig:
    """Settings of the HTTP service (`palr serve`): where it listens and how it is hardened."""

    host: str = field(default="127.0.0.1", metadata=opt(
        "Interface to bind; 0.0.0.0 exposes the service to the network."))
    port: int = field(default=8000, metadata=opt("TCP port."))
    token: str | None = field(default=None, metadata=opt(
        "Bearer token the API requires (default: none, open).", envvar="PALR_TOKEN"))
    cors_origins: list[str] = field(default_factory=list, metadata=opt(
        "An origin allowed by CORS (repeatable; default: off).", "--cors-origin"))
    max_body_bytes: int = field(default=256 * 1024, metadata=opt("Request body limit in bytes (413).", "--max-body"))
    max_concurrent: int = field(default=4, metadata=opt("Requests computed at once."))
    max_queue: int = field(default=64, metadata=opt("Requests waiting for a slot; more get 503."))
    body_timeout: float = field(default=10.0, metadata=opt(
        "Seconds a client has to send a request's headers (closed after), and again its body (408 after); "
        "a slow client never holds a compute slot."))
    keep_alive: int = field(default=5, metadata=opt("Seconds an idle keep-alive connection stays open."))
    max_connections: int = field(default=512, metadata=opt(
        "Open connections at most (uvicorn's limit_concurrency); a further request gets 503."))

    def __post_init__(self) -> None:

        if self.max_body_bytes < 1024 or self.max_concurrent < 1 or self.max_queue < 0:
            raise InputError("need max_body_bytes >= 1024, max_concurrent >= 1 and max_queue >= 0")
        if not 0 < self.body_timeout <= 600 or not 1 <= self.keep_alive <= 600:
            raise InputError("need 0 < body_timeout <= 600 and 1 <= keep_alive <= 600 (seconds)")
        if self.max_connections < self.max_concurrent + self.max_queue + 16:
            raise InputError(f"max_connections must leave room above the compute slots and the queue: need >= "
                             f"{self.max_concurrent + self.max_queue + 16}, got {self.max_connections}")
        if self.token is not None and not self.token.strip():
            raise InputError("an empty token would protect nothing: give a non-empty --token or none")


@dataclass
class ServeConfig:
    """Web page at / and JSON API: GET /items?q=, GET /users/ID, POST /recommend (docs at /docs)."""

    run: Path = field(metadata=opt("A PALR run (palr finetune), or a retriever run with --llm.", also_positional=True))
    service: ServiceConfig = field(default_factory=ServiceConfig)
    llm: str | None = field(default=None, metadata=opt(LLM_HELP))
    allow_fallback: bool = field(default=False, metadata=opt(FALLBACK_HELP))
    trust_run_llm: bool = field(default=False, metadata=opt(TRUST_HELP))
    data_dir: Path | None = field(default=None, metadata=opt(RUN_DATA_HELP))


@dataclass
class ReportConfig:
    """One self-contained HTML report: curves, test metrics with CIs, segments, recall ceiling, examples."""

    runs: list[Path] = field(default_factory=list, metadata=opt(
        "A run directory (a PALR or retriever run, or a demo folder; repeatable).", "--run", also_positional=True,
        metavar="PATH"))
    out: Path = field(default=Path("report.html"), metadata=opt("The HTML file to write.", "-o", "--out"))
    examples: int = field(default=3, metadata=opt("Example users per PALR run."))
    seed: int = field(default=0, metadata=opt("Seed of the bootstrap resampling."))
    data_dir: Path | None = field(default=None, metadata=opt(RUN_DATA_HELP))

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("give at least one run directory")
        if self.examples < 0:
            raise ConfigError(f"--examples must be >= 0, got {self.examples}")


@dataclass
class CompareConfig:
    """Compare two models on the same users: paired-bootstrap 95% CIs of the difference and ratio, p-value."""

    a: Path = field(metadata=opt("The new model: a per-user CSV (--per-user) or a predictions JSONL.", argument=True))
    b: Path = field(metadata=opt("The baseline: a per-user CSV or a predictions JSONL.", argument=True))
    run: Path | None = field(default=None, metadata=opt(
        "The run whose data snapshot scores a predictions file (or --dataset: the raw data set)."))
    data: DataSpec = field(default_factory=DataSpec)  # needed to score a predictions file without --run
    stage: Literal["test", "valid"] = field(default="test", metadata=opt("Targets of a predictions file."))
    a_model: str | None = field(default=None, metadata=opt("The model in A (a per-user file with several)."))
    b_model: str | None = field(default=None, metadata=opt("The model in B (a per-user file with several)."))
    k: list[int] = field(default_factory=list, metadata=opt(
        "Cut-offs for predictions files (repeatable; default 5, 10, 20)."))
    n_boot: int = field(default=2000, metadata=opt("Bootstrap replicates."))
    seed: int = field(default=0, metadata=opt("Bootstrap seed."))
    out: Path | None = field(default=None, metadata=opt("Write the comparison as JSON here.", "-o", "--out"))
    json: bool = field(default=False, metadata=opt("Print JSON."))

    def __post_init__(self) -> None:
        _positive(n_boot=self.n_boot)


@dataclass
class DemoConfig:
    """End to end on the embedded model: data, SASRec, profiles, fine-tuning, evaluation, examples."""

    dataset: str = field(default="ml-100k", metadata=opt("Data set.", "-d", "--dataset"))
    out: Path = field(default=Path("runs/demo"), metadata=opt("Where all outputs go.", "-o", "--out"))
    quick: bool = field(default=False, metadata=opt("A short run (about 1 minute)."))
    seed: int = field(default=0, metadata=opt("Random seed."))
    data_dir: Path | None = field(default=None, metadata=opt("Data directory (default: $PALR_DATA_DIR)."))
    overwrite: bool = field(default=False, metadata=opt("Replace earlier demo runs made with other settings."))
