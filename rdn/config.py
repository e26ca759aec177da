"""Validated parameters: one pydantic model per section of ``params.yaml``.

Every stage calls :func:`load_params` before it touches any data. Validation is
strict (``extra="forbid"``, no silent type coercion, bounds on every number) and
reports *every* problem at once, each as the key path the user typed plus the
offending value, e.g. ``base_train.device_batch_size: must be >= 1 (got -3)``.

A params file may start with ``extends: <path>``; it is then deep-merged over that
base file (path relative to the extending file). This is how the GPU presets in
``configs/`` stay small: they state only what differs from ``params.yaml``.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TaskName = Literal["calculator", "tictactoe", "brackets", "spelling"]
"""Task families the post-training stages know, in registry order. The one list of them:
``rdn.tasks`` registers one family per name and refuses to import if the two disagree."""
TASK_NAMES: tuple[str, ...] = get_args(TaskName)


class ParamsError(ValueError):
    """Invalid params: ``problems`` holds one ``key.path: message (got VALUE)`` line each."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        n = len(self.problems)
        super().__init__(f"{head}{n} problem{'s' if n != 1 else ''} in params\n" + "\n".join(self.problems))


class _CrossFieldProblems(ValueError):
    """Raised by section validators; carries (key, message, value) triples so the
    error report can name the exact key rather than the whole section."""

    def __init__(self, problems: list[tuple[str, str, Any]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m, _ in problems))


def _raise_problems(problems: list[tuple[str, str, Any]]) -> None:
    if problems:
        raise _CrossFieldProblems(problems)


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, frozen=True)


# --------------------------------------------------------------------------- shared sections

class RunConfig(Section):
    name: str = Field("tiny", min_length=1, max_length=100)
    """Label of this pipeline configuration; recorded on every MLflow run."""
    seed: int = Field(1337, ge=0, le=2**31 - 1)
    """Seed for every random choice of training and evaluation (init, batch order, generated
    task data, sampling); the corpus shuffle has its own ``data.seed``."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where training runs; ``auto`` picks CUDA, then MPS, then CPU."""


class CoordsConfig(Section):
    n_dim: int = Field(8, ge=1, le=64)
    """Number of hierarchical coordinate dimensions; deeper nesting shares the last one."""
    bracket_pairs: list[str] = Field(default_factory=lambda: ["()", "[]", "{}", "<>"], min_length=1)
    """Opener/closer pairs, each a two-character string, that change the depth."""

    @model_validator(mode="after")
    def _pairs(self) -> "CoordsConfig":
        problems = []
        seen: set[str] = set()
        for i, pair in enumerate(self.bracket_pairs):
            if len(pair) != 2 or pair[0] == pair[1]:
                problems.append((f"bracket_pairs.{i}", "must be two different characters, opener then closer", pair))
                continue
            for ch in pair:
                if ch in seen:
                    problems.append((f"bracket_pairs.{i}", f"character {ch!r} already used by another pair", pair))
                seen.add(ch)
        _raise_problems(problems)
        return self


class TrackingConfig(Section):
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow."""
    uri: str | None = None
    """MLflow tracking URI; null = ``sqlite:///<project>/mlflow/mlflow.db``. ``MLFLOW_TRACKING_URI`` overrides."""
    experiment: str = Field("rdn", min_length=1, max_length=200)
    """MLflow experiment that every stage run lands in."""
    log_every: int = Field(10, ge=1, le=100_000)
    """Training steps between metric flushes (MLflow calls are batched)."""
    timeout_s: float = Field(10.0, gt=0, le=600)
    """Seconds to wait for a tracking server before warning and carrying on without it."""
    tensorboard: bool = False
    """Also write every metric a stage logs (same key, value and step) to TensorBoard event
    files under ``<project>/runs/<run.name>[@<DVC experiment or parent run id>]/<stage>``, so
    ``tensorboard --logdir runs`` shows one line per stage run; rank 0 only. Works with
    ``enabled: false`` too (TensorBoard without MLflow)."""


# --------------------------------------------------------------------------- data + tokenizer

class DataConfig(Section):
    seed: int = Field(1337, ge=0, le=2**31 - 1)
    """Shuffle seed of the corpus shards, apart from ``run.seed`` so that runs differing only in
    their training seed (an ablation's seeds) share data and tokenizer."""
    source: Literal["stdlib", "folder", "parquet"] = "stdlib"
    """``stdlib``: the running interpreter's standard-library sources (offline, bracket-rich code);
    ``folder``: .txt/.md/.py/.jsonl files under ``path``; ``parquet``: existing shards under ``path``."""
    path: str | None = None
    """Folder read by the ``folder`` and ``parquet`` sources (relative to the project root)."""
    text_column: str = Field("text", min_length=1)
    """Column (parquet) or JSON key (jsonl) holding a document's text."""
    extensions: list[str] = Field(default_factory=lambda: [".txt", ".md", ".py", ".jsonl"], min_length=1)
    """File suffixes the ``folder`` source reads."""
    include_tests: bool = True
    """``stdlib`` only: include the interpreter's own test suites (about 60% of its source)."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of documents held out for validation, chosen by a hash of each document's name."""
    min_chars: int = Field(16, ge=1, le=10**6)
    """Documents shorter than this are dropped."""
    max_total_bytes: int | None = Field(None, ge=1)
    """Stop reading after this many UTF-8 bytes of text (null = read everything)."""
    docs_per_shard: int = Field(2000, ge=1, le=10**7)
    """Documents per parquet shard."""
    row_group_docs: int = Field(256, ge=1, le=10**6)
    """Documents per parquet row group (the unit a loader reads at once)."""

    @model_validator(mode="after")
    def _cross(self) -> "DataConfig":
        problems = []
        if self.source in ("folder", "parquet") and not self.path:
            problems.append(("path", f"required when source is {self.source!r}", self.path))
        for i, ext in enumerate(self.extensions):
            if not ext.startswith(".") or len(ext) < 2:
                problems.append((f"extensions.{i}", "must look like '.txt'", ext))
        if self.row_group_docs > self.docs_per_shard:
            problems.append(("row_group_docs", f"must be <= docs_per_shard ({self.docs_per_shard})", self.row_group_docs))
        _raise_problems(problems)
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=512, le=1_048_576)
    """Vocabulary size including the 256 byte tokens and the special tokens."""
    max_chars: int = Field(20_000_000, ge=10_000, le=10**12)
    """Characters of training text fed to the BPE trainer."""
    doc_cap: int = Field(10_000, ge=100, le=10**8)
    """At most this many characters are taken from any one document."""


# --------------------------------------------------------------------------- model

class MoESection(Section):
    """DeepSeek MoE feed-forward layers (DeepSeek-V3, arXiv:2412.19437): more parameters at the
    same FLOPs per token."""

    enabled: bool = False
    """Replace the dense MLP of the layers after ``first_dense_layers`` with routed experts."""
    num_experts: int = Field(8, ge=1, le=1024)
    """Routed experts per MoE layer."""
    num_shared: int = Field(1, ge=0, le=64)
    """Always-on shared experts per MoE layer."""
    top_k: int = Field(2, ge=1, le=64)
    """Routed experts each token uses."""
    expert_hidden: int | None = Field(None, ge=8, le=1_048_576)
    """Hidden width of one expert; null = the dense hidden (4 x width) / top_k, rounded to 64."""
    first_dense_layers: int = Field(1, ge=0, le=256)
    """Leading layers that keep the dense MLP."""
    bias_update_rate: float = Field(1e-3, ge=0.0, le=1.0)
    """Aux-loss-free balancing: per step, each expert's routing bias moves by this times the
    sign of (mean load - its load). 0 disables."""
    seq_aux_loss_weight: float = Field(1e-4, ge=0.0, le=10.0)
    """Weight of the sequence-wise balance loss; 0 disables it."""
    expert_optimizer: Literal["muon", "adamw"] = "muon"
    """Routed experts' optimizer: Muon (each expert's matrix orthogonalised on its own) or
    AdamW at the embedding LR (the seed's choice)."""

    @model_validator(mode="after")
    def _cross(self) -> "MoESection":
        if self.top_k > self.num_experts:
            _raise_problems([("top_k", f"must be <= num_experts ({self.num_experts})", self.top_k)])
        return self


class MHCSection(Section):
    """mHC, manifold-constrained hyper-connections (arXiv:2512.24880): a widened residual
    stream mixed by doubly-stochastic matrices."""

    streams: int = Field(1, ge=1, le=16)
    """Residual streams; 1 = the plain residual (off)."""
    sinkhorn_iters: int = Field(20, ge=1, le=1000)
    """Sinkhorn-Knopp iterations projecting H_res onto doubly-stochastic matrices."""


class MTPSection(Section):
    """Multi-token prediction heads (DeepSeek-V3's sequential modules): a denser training
    signal, and drafters for self-speculative decoding."""

    num_future: int = Field(0, ge=0, le=4)
    """Extra heads, head k predicting the token k+1 steps ahead; 0 = off."""
    weights: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125], min_length=1, max_length=4)
    """Relative weight of each head's loss (normalised over the heads in use)."""
    loss_weight: float = Field(0.2, ge=0.0, le=10.0)
    """Total weight of the MTP loss next to the main loss; 0 = measured, not trained on."""

    @model_validator(mode="after")
    def _cross(self) -> "MTPSection":
        problems = []
        if len(self.weights) < self.num_future:
            problems.append(("weights", f"needs one weight per head (num_future = {self.num_future})", self.weights))
        for i, w in enumerate(self.weights):
            if w < 0:
                problems.append((f"weights.{i}", "must be >= 0", w))
        _raise_problems(problems)
        return self


class TernarySection(Section):
    """BitNet b1.58 (arXiv:2402.17764): the blocks' linear layers use {-1, 0, +1} weights and
    low-bit activations; 2-bit weights at export."""

    enabled: bool = False
    """Quantise the transformer blocks' linear layers (embeddings and lm_head stay full precision)."""
    activation_bits: int = Field(8, ge=2, le=16)
    """Bits of the per-token absmax activation quantisation."""


class ModelConfig(Section):
    depth: int = Field(4, ge=1, le=256)
    """Number of transformer layers: the single size dial; width, heads and LRs follow."""
    aspect_ratio: int = Field(64, ge=8, le=1024)
    """Width per layer: ``n_embd = aspect_ratio * depth`` rounded up to a multiple of 128."""
    head_dim: int = Field(128, ge=8, le=512)
    """Channels per attention head."""
    n_embd: int | None = Field(None, ge=8, le=65_536)
    """Override the derived width."""
    n_kv_head: int | None = Field(None, ge=1, le=1024)
    """Key/value heads (GQA); null = as many as query heads."""
    window_pattern: str = Field("L", min_length=1, max_length=64, pattern=r"^[SL]+$")
    """Per-layer attention windows, tiled over depth: ``L`` full, ``S`` short; the last layer is always full."""
    short_window: int | None = Field(None, ge=16, le=1_048_576)
    """Tokens a short-window layer sees; null = half the sequence length."""
    sequence_len: int = Field(512, ge=16, le=1_048_576)
    """Longest sequence the model is built for (rotary cache and coordinate tables)."""
    use_coordinates: bool = True
    """RDN mode: add hierarchical coordinate embeddings. False = plain GPT baseline."""
    value_embeddings: bool = True
    """ResFormer value embeddings on alternating layers (always the last)."""
    logit_softcap: float = Field(15.0, ge=0.0, le=1000.0)
    """tanh soft cap on the logits; 0 disables it."""
    vocab_pad_multiple: int = Field(64, ge=1, le=4096)
    """Embedding and lm_head rows are padded to a multiple of this."""
    moe: MoESection = Field(default_factory=MoESection)
    """DeepSeek MoE feed-forward layers (off by default)."""
    mhc: MHCSection = Field(default_factory=MHCSection)
    """mHC residual streams (off by default)."""
    mtp: MTPSection = Field(default_factory=MTPSection)
    """Multi-token prediction heads (off by default)."""
    ternary: TernarySection = Field(default_factory=TernarySection)
    """Ternary (BitNet b1.58) weights (off by default)."""

    @property
    def width(self) -> int:
        if self.n_embd is not None:
            return self.n_embd
        return int(math.ceil(self.aspect_ratio * self.depth / 128) * 128)

    @property
    def n_head(self) -> int:
        return max(1, self.width // self.head_dim)

    @model_validator(mode="after")
    def _cross(self) -> "ModelConfig":
        problems = []
        width = self.width
        key = "n_embd" if self.n_embd is not None else "head_dim"
        if width % self.head_dim != 0:
            problems.append((key, f"model width {width} must be a multiple of head_dim {self.head_dim}", self.n_embd if self.n_embd is not None else self.head_dim))
        if self.head_dim % 2:
            problems.append(("head_dim", "must be even (rotary embeddings rotate channel pairs)", self.head_dim))
        if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
            problems.append(("n_kv_head", f"must divide the number of query heads ({self.n_head})", self.n_kv_head))
        if self.short_window is not None and self.short_window > self.sequence_len:
            problems.append(("short_window", f"must be <= sequence_len ({self.sequence_len})", self.short_window))
        if self.moe.enabled and self.moe.first_dense_layers >= self.depth:
            problems.append(("moe.first_dense_layers", f"must be < depth ({self.depth}) for any layer to be an MoE",
                             self.moe.first_dense_layers))
        _raise_problems(problems)
        return self


# --------------------------------------------------------------------------- training stages

class ColliderSection(Section):
    """Collider token filtering (arXiv:2502.00340): the least important tokens of each step
    are dropped from the backward pass of every linear layer, whose backward matmuls then run
    on the kept rows only (gathered, dense)."""

    filter_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the supervised tokens (the lowest per-token losses) dropped from backward;
    0 = off (bitwise the plain step)."""
    warmup_steps: int = Field(0, ge=0, le=10**9)
    """Steps with the full backward before filtering starts."""


class TrainConfig(Section):
    """Knobs shared by base_train, mid_train and chat_sft (one training loop serves all three)."""

    device_batch_size: int = Field(4, ge=1, le=65_536)
    """Sequences per forward/backward pass on one device."""
    total_batch_size: int = Field(4096, ge=1, le=2**31)
    """Tokens per optimizer step, summed over gradient accumulation and ranks."""
    seq_len: int = Field(512, ge=16, le=1_048_576)
    """Tokens per training row."""
    num_iterations: int | None = Field(200, ge=1, le=10**9)
    """Optimizer steps; set exactly one of this and ``target_param_data_ratio``."""
    target_param_data_ratio: float | None = Field(None, gt=0, le=10_000)
    """Derive steps from tokens = ratio x scaling parameters (Chinchilla ~20)."""
    embedding_lr: float = Field(0.3, ge=0, le=10)
    """AdamW LR of the token embedding (scaled by (d_model/768)^-0.5)."""
    unembedding_lr: float = Field(0.004, ge=0, le=10)
    """AdamW LR of lm_head (scaled by (d_model/768)^-0.5)."""
    matrix_lr: float = Field(0.02, ge=0, le=10)
    """Muon LR of the transformer matrices."""
    scalar_lr: float = Field(0.5, ge=0, le=10)
    """AdamW LR of per-layer scalars."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """Muon (cautious) weight decay at the start; decays linearly to zero."""
    adam_beta1: float = Field(0.8, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Share of steps with linear LR warmup."""
    warmdown_ratio: float = Field(0.4, ge=0, le=1)
    """Share of final steps with linear LR warmdown."""
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    """LR at the end of warmdown as a fraction of the peak."""
    grad_clip: float = Field(0.0, ge=0, le=1e6)
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = Field(50, ge=1, le=10**9)
    """Steps between validation bits-per-byte evaluations."""
    eval_tokens: int = Field(32_768, ge=1, le=10**12)
    """Validation tokens per evaluation."""
    sample_every: int = Field(100, ge=1, le=10**9)
    """Steps between printed model samples."""
    save_every: int = Field(100, ge=1, le=10**9)
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = Field(2, ge=1, le=1000)
    """Checkpoints kept on disk; older ones are deleted."""
    resume: Literal["auto", "never"] = "auto"
    """``auto`` continues from the newest complete checkpoint of this stage."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model: ``auto`` = on CUDA only."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype: ``auto`` = bfloat16 on CUDA, float32 elsewhere."""
    loader_buffer_docs: int = Field(256, ge=1, le=10**7)
    """Documents buffered for BOS-aligned best-fit packing."""
    prefetch: int = Field(2, ge=0, le=1024)
    """Batches prepared ahead by a background thread (0 = none)."""
    collider: ColliderSection = Field(default_factory=ColliderSection)
    """Collider token filtering of the backward pass (off by default)."""

    @model_validator(mode="after")
    def _cross(self) -> "TrainConfig":
        problems = []
        per_pass = self.device_batch_size * self.seq_len
        if self.total_batch_size % per_pass != 0:
            problems.append(("total_batch_size", f"must be divisible by device_batch_size * seq_len = {per_pass}", self.total_batch_size))
        if (self.num_iterations is None) == (self.target_param_data_ratio is None):
            problems.append(("num_iterations", "set exactly one of num_iterations and target_param_data_ratio", self.num_iterations))
        if self.warmup_ratio + self.warmdown_ratio > 1:
            problems.append(("warmdown_ratio", f"warmup_ratio + warmdown_ratio must be <= 1 (warmup_ratio is {self.warmup_ratio})", self.warmdown_ratio))
        _raise_problems(problems)
        return self


PARQUET_KINDS = ("gsm8k", "mmlu", "arc", "smoltalk")


def _check_parquet_sets(sets: dict[str, str]) -> list[tuple[str, str, Any]]:
    return [(f"parquet_sets.{kind}", f"unknown kind; known: {', '.join(PARQUET_KINDS)}", path)
            for kind, path in sets.items() if kind not in PARQUET_KINDS]


def _check_task_mixture(tasks: dict[str, int], key: str) -> list[tuple[str, str, Any]]:
    problems = []
    for name, n in tasks.items():
        if name not in TASK_NAMES:
            hint = _did_you_mean(name, TASK_NAMES)
            problems.append((f"{key}.{name}", f"unknown task; known: {', '.join(TASK_NAMES)}{hint}", n))
        elif n < 0:
            problems.append((f"{key}.{name}", "must be >= 0", n))
    return problems


class BaseTrainConfig(TrainConfig):
    pass


class PostTrainConfig(TrainConfig):
    """What mid_train and chat_sft share on top of :class:`TrainConfig`: fewer steps, and a
    mixture of generated task conversations plus optional local conversation data."""

    num_iterations: int | None = Field(100, ge=1, le=10**9)
    """Optimizer steps; set exactly one of this and ``target_param_data_ratio``."""
    tasks: dict[str, int]
    """Generated training conversations per task (each stage sets its own default mixture)."""
    conversations_path: str | None = None
    """Optional JSONL file of extra conversations (``[{"role", "content"}, ...]`` per line)."""
    parquet_sets: dict[str, str] = Field(default_factory=dict)
    """Local parquet copies of public sets in their usual columns: kind (gsm8k, mmlu, arc, smoltalk) -> path."""

    @model_validator(mode="after")
    def _tasks(self) -> "PostTrainConfig":
        _raise_problems(_check_task_mixture(self.tasks, "tasks") + _check_parquet_sets(self.parquet_sets))
        return self


class MidTrainConfig(PostTrainConfig):
    pretrain_fraction: float = Field(0.5, ge=0, le=1)
    """Share of rows drawn from pretraining text; the rest are task conversations."""
    tasks: dict[str, int] = Field(default_factory=lambda: {"calculator": 2000, "tictactoe": 500, "brackets": 1000, "spelling": 500})
    """Generated training conversations per task."""


class ChatSFTConfig(PostTrainConfig):
    init_lr_frac: float = Field(0.5, gt=0, le=1)
    """Peak LRs are this fraction of the base LRs."""
    tasks: dict[str, int] = Field(default_factory=lambda: {"calculator": 1000, "tictactoe": 250, "brackets": 500, "spelling": 250})
    """Generated training conversations per task."""


class ChatRLConfig(Section):
    task: TaskName = "calculator"
    """Verifiable task whose scorer gives the reward."""
    num_steps: int = Field(30, ge=1, le=10**9)
    """Policy-gradient steps."""
    prompts_per_step: int = Field(8, ge=1, le=65_536)
    """Distinct prompts per step."""
    samples_per_prompt: int = Field(8, ge=1, le=1024)
    """Completions sampled per prompt (the group for relative advantages)."""
    device_batch_size: int = Field(8, ge=1, le=65_536)
    """Sequences per forward/backward pass."""
    max_new_tokens: int = Field(64, ge=1, le=65_536)
    """Longest sampled completion."""
    temperature: float = Field(1.0, ge=0, le=10)
    """Sampling temperature."""
    top_k: int | None = Field(50, ge=1, le=1_048_576)
    """Sample among the k most likely tokens (null = all)."""
    init_lr_frac: float = Field(0.05, gt=0, le=1)
    """Peak LRs as a fraction of the base LRs; decays linearly to zero."""
    normalize_advantages: bool = False
    """Divide group-relative advantages by the group's std."""
    clip_eps: float | None = Field(None, gt=0, le=10)
    """PPO-style ratio clipping (null = off, as in nanochat)."""
    kl_coef: float = Field(0.0, ge=0, le=100)
    """KL penalty to the SFT reference (0 = off)."""
    eval_every: int = Field(10, ge=1, le=10**9)
    """Steps between pass@k evaluations."""
    eval_examples: int = Field(64, ge=1, le=10**7)
    """Held-out prompts per evaluation."""
    save_every: int = Field(10, ge=1, le=10**9)
    """Steps between checkpoints."""
    keep_last: int = Field(2, ge=1, le=1000)
    """Checkpoints kept on disk; older ones are deleted."""
    resume: Literal["auto", "never"] = "auto"
    """``auto`` continues from the newest complete checkpoint."""

    @model_validator(mode="after")
    def _cross(self) -> "ChatRLConfig":
        problems = []
        if self.samples_per_prompt < 2:
            problems.append(("samples_per_prompt", "must be >= 2: group-relative advantages need a group", self.samples_per_prompt))
        _raise_problems(problems)
        return self


class EvaluateConfig(Section):
    stages: list[Literal["base", "mid", "sft", "rl"]] = Field(default_factory=lambda: ["base", "mid", "sft", "rl"], min_length=1)
    """Checkpoints to evaluate."""
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASK_NAMES))
    """Held-out task sets scored on chat checkpoints."""
    num_examples: int = Field(100, ge=1, le=10**7)
    """Held-out examples per task."""
    rl_task_examples: int = Field(500, ge=1, le=10**7)
    """Held-out examples of ``chat_rl.task`` (at least ``num_examples``): the SFT-vs-RL
    sign test needs a few hundred problems to see a gain of a few points."""
    bpb_tokens: int = Field(65_536, ge=1, le=10**12)
    """Validation tokens for bits-per-byte."""
    max_new_tokens: int = Field(64, ge=1, le=65_536)
    """Longest generated answer."""
    temperature: float = Field(0.0, ge=0, le=10)
    """0 = greedy decoding."""
    batch_size: int = Field(16, ge=1, le=65_536)
    """Prompts generated at once."""


# --------------------------------------------------------------------------- optimizer

class GaLoreConfig(Section):
    """GaLore's low-rank projection (``optim.matrix: galore_adamw``; Zhao et al. 2024,
    arXiv:2403.03507; defaults as GaLore 2, arXiv:2504.20437)."""

    rank: int = Field(128, ge=1, le=65536)
    """Rank r of the projected gradient; matrices whose smaller side is <= r get plain AdamW."""
    update_proj_gap: int = Field(200, ge=1, le=1_000_000)
    """Steps between SVD refreshes of each matrix's projector (the first step included)."""
    scale: float = Field(0.25, gt=0, le=10)
    """Factor on the projected-back update (GaLore's alpha)."""


class OptimConfig(Section):
    """Optimizer settings shared by every training stage (base, mid, SFT, RL). The default
    (fp32 states, Muon on matrices, AdamW on the rest) is the baseline optimizer, bit for bit;
    the variants are documented in :mod:`rdn.optim.variants` and :class:`rdn.optim.MuonAdamW`.
    A checkpoint trained under one variant is not resumed under another."""

    orthogonalization_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of Muon's Polar Express orthogonalisation: ``auto`` = bfloat16 on CUDA and on
    CPUs with native bf16 matmul (AVX512-BF16/AMX, as torch's mkldnn check reports), float32
    elsewhere (an AVX2-only CPU emulates bf16 matmuls at tens of times the float32 cost). A
    resumed run keeps the dtype its checkpoint was trained with."""
    state_dtype: Literal["fp32", "int8"] = "fp32"
    """Optimizer moments: ``fp32`` (the parameters' dtype) or ``int8``: blockwise (256) absmax
    8-bit codes on a dynamic map (Dettmers et al. 2022, arXiv:2110.02861) for Muon's momentum,
    NorMuon's second moment and AdamW/Lion/GaLore moments of >= 4096 elements (74.6 % fewer
    bytes each; :mod:`rdn.optim.quant8`)."""
    matrix: Literal["muon", "lion", "adamw", "galore_adamw"] = "muon"
    """Update of the transformer matrices (MoE experts, mHC matrices included). Each takes
    ``matrix_lr`` converted to Muon's per-element step size: AdamW and GaLore run at
    ``matrix_lr / (0.2 sqrt(fan_in))`` (Moonlight, arXiv:2502.16982), Lion at that times
    ``lion_lr_scale``; all keep Muon's weight decay per step (lr x wd)."""
    vector: Literal["adamw", "lion"] = "adamw"
    """Update of embeddings, lm_head and scalars; ``lion`` takes the AdamW LRs times
    ``lion_lr_scale`` and the weight decay divided by it (Muon + Lion hybrid)."""
    lion_lr_scale: float = Field(0.1, gt=0, le=1)
    """Lion's LR as a fraction of the AdamW LR it replaces; its weight decay is divided by it,
    so lr x wd is unchanged. Lion (Chen et al. 2023, arXiv:2302.06675) wants an LR 3-10x
    smaller and a weight decay 3-10x larger than AdamW's; 0.2 would match the step sizes (a
    sign step has RMS 1, an AdamW step about 0.2), but at the tiny model 0.1 trained best
    (200 steps: 0.1, 0.2, 0.5 cost +2.1, +6.4, +9.2 % val bpb as the vector update;
    benchmarks/optim_memory.py)."""
    galore: GaLoreConfig = Field(default_factory=GaLoreConfig)
    """Low-rank projection of ``matrix: galore_adamw``; shards under torchrun like Muon (whole
    matrices per rank)."""


# --------------------------------------------------------------------------- distributed launch

class DistConfig(Section):
    """How the training stages (base_train, mid_train, chat_sft, chat_rl) are launched.

    One process when ``nproc_per_node * nnodes == 1``; otherwise the stage re-executes itself
    under ``torchrun`` with these settings (a stage already started by torchrun -- Slurm,
    Kubernetes -- uses the launcher's world instead)."""

    nproc_per_node: int = Field(1, ge=1, le=1024)
    """Processes per node, normally one per GPU (CPU runs: processes sharing the cores)."""
    nnodes: int = Field(1, ge=1, le=100_000)
    """Nodes taking part; each runs the same command and they meet at ``rdzv_endpoint``."""
    rdzv_endpoint: str | None = Field(None, min_length=3, max_length=300)
    """``host:port`` of the c10d rendezvous (required when nnodes > 1; one node uses a private one)."""
    rdzv_id: str = Field("rdn", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    """Rendezvous id shared by the nodes of one job (distinct per concurrent job on one endpoint)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: ``auto`` = nccl when training on CUDA, gloo otherwise."""
    timeout_s: float = Field(900.0, ge=10, le=86_400)
    """Longest wait in one collective before it fails instead of hanging (checkpoints, evals count)."""
    node_launcher: Literal["external", "local", "k8s"] = "external"
    """Who starts nodes 1..nnodes-1 (see rdn/pipeline/launch.py): ``external`` = Slurm / a Kubernetes
    Job start every node; ``local`` = this process starts them on this machine; ``k8s`` =
    this process (e.g. a Prefect flow-run pod) creates a Job for them from ``k8s_manifest``."""
    k8s_image: str | None = Field(None, min_length=1, max_length=500)
    """Container image of the other nodes' pods (node_launcher k8s; normally the flow pod's own)."""
    k8s_namespace: str | None = Field(None, min_length=1, max_length=63)
    """Namespace of that Job (default: this pod's namespace)."""
    k8s_manifest: str = Field("infra/k8s/train-multinode.yaml", min_length=1, max_length=500)
    """Job template (project-relative) the other nodes' Job is made from."""

    @model_validator(mode="after")
    def _cross(self) -> "DistConfig":
        problems = []
        if self.nnodes > 1 and not self.rdzv_endpoint and self.node_launcher == "external":
            problems.append(("rdzv_endpoint", "required when nnodes > 1 and node_launcher is external "
                             "(host:port every node can reach)", self.rdzv_endpoint))
        if self.node_launcher == "k8s" and not self.k8s_image:
            problems.append(("k8s_image", "required when node_launcher is k8s (the other nodes' image)",
                             self.k8s_image))
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            problems.append(("rdzv_endpoint", "must look like host:port", self.rdzv_endpoint))
        _raise_problems(problems)
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# --------------------------------------------------------------------------- the whole file

class Params(Section):
    """The whole ``params.yaml``: every section is required."""

    run: RunConfig
    """Run name, seed and device shared by every stage."""
    coords: CoordsConfig
    """Hierarchical coordinate settings shared by the model, loader and evaluation."""
    tracking: TrackingConfig
    """Where and how often MLflow records runs."""
    data: DataConfig
    """Corpus source and parquet sharding (stage ``data``)."""
    tokenizer: TokenizerConfig
    """BPE training (stage ``tokenizer``)."""
    model: ModelConfig
    """Architecture of the model that base_train builds."""
    base_train: BaseTrainConfig
    """Base pretraining (stage ``base_train``)."""
    mid_train: MidTrainConfig
    """Mid-training on text plus task conversations (stage ``mid_train``)."""
    chat_sft: ChatSFTConfig
    """Supervised fine-tuning on conversations (stage ``chat_sft``)."""
    chat_rl: ChatRLConfig
    """On-policy RL on verifiable tasks (stage ``chat_rl``)."""
    evaluate: EvaluateConfig
    """Evaluation of every stage's checkpoint (stage ``evaluate``)."""
    dist: DistConfig
    """Single-process or torchrun launch of the training stages."""
    optim: OptimConfig
    """Optimizer settings shared by every training stage."""

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        _raise_problems(_cross_section_problems(dict(self)))
        return self

    def section_dict(self, *names: str) -> dict[str, Any]:
        """Plain dict of the named sections (for logging and meta.json)."""
        return {n: getattr(self, n).model_dump(mode="json") for n in names}


def _cross_section_problems(sections: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Checks that span sections; each runs when the sections it reads are valid, so it is
    reported together with problems elsewhere instead of on a second run."""
    problems = []
    model, dist = sections.get("model"), sections.get("dist")
    for name in ("base_train", "mid_train", "chat_sft"):
        sec = sections.get(name)
        if model is not None and sec is not None and sec.seq_len > model.sequence_len:
            problems.append((f"{name}.seq_len", f"must be <= model.sequence_len ({model.sequence_len})", sec.seq_len))
        if model is not None and sec is not None and sec.collider.filter_fraction > 0:
            # Filtering steps backpropagate per-token losses only: the MTP and MoE balance terms
            # of the model's training forward would be dropped, and ternary layers keep their
            # own straight-through backward.
            for variant, on in (("model.mtp.num_future", model.mtp.num_future > 0),
                                ("model.ternary.enabled", model.ternary.enabled)):
                if on:
                    problems.append((f"{name}.collider.filter_fraction", f"Collider cannot be combined with "
                                     f"{variant} (its loss or backward is not filtered)",
                                     sec.collider.filter_fraction))
        if sec is not None and dist is not None and dist.world_size > 1:
            per_step = sec.device_batch_size * sec.seq_len * dist.world_size
            if sec.total_batch_size % per_step:
                problems.append((f"{name}.total_batch_size", f"must be divisible by device_batch_size * seq_len * "
                                 f"ranks (dist: {dist.nproc_per_node} x {dist.nnodes}) = {per_step}",
                                 sec.total_batch_size))
    rl = sections.get("chat_rl")
    if rl is not None and dist is not None and rl.prompts_per_step < dist.world_size:
        problems.append(("chat_rl.prompts_per_step", f"must be >= the number of ranks ({dist.world_size}: every "
                         "rank samples its own prompts)", rl.prompts_per_step))
    return problems


SPECIAL_TOKENS = (
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
)


# --------------------------------------------------------------------------- loading + error report

def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fmt_value(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``path`` (for 'did you mean')."""
    model: Any = Params
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format_errors(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        etype = err["type"]
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, _CrossFieldProblems):
            for key, msg, value in inner.problems:
                lines.append(f"{'.'.join(loc + (key,))}: {msg} (got {_fmt_value(value)})")
            continue
        path = ".".join(loc)
        value = err.get("input")
        if etype == "extra_forbidden":
            owner = _model_at(loc[:-1])
            hint = _did_you_mean(loc[-1], owner.model_fields) if owner else ""
            lines.append(f"{path}: unknown key{hint}")
        elif etype == "missing":
            what = "section" if len(loc) == 1 else "key"
            lines.append(f"{path}: missing required {what}")
        elif etype in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[etype]
            bound = next(iter(v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")), "?")
            lines.append(f"{path}: must be {op} {bound} (got {_fmt_value(value)})")
        elif etype == "model_type" and len(loc) == 1:
            lines.append(f"{path}: must be a mapping of keys to values (got {_fmt_value(value)})")
        else:
            msg = err["msg"]
            msg = msg.removeprefix("Value error, ")
            msg = msg[0].lower() + msg[1:] if msg else msg
            lines.append(f"{path or '<top level>'}: {msg} (got {_fmt_value(value)})")
    return lines


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a params YAML into a dict, resolving ``extends:`` chains. Raises ParamsError."""
    path = Path(path)
    if not path.exists():
        raise ParamsError([f"{path}: file not found"], str(path))
    if path.resolve() in _seen:
        raise ParamsError([f"{path}: 'extends' chain loops back to this file"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError([f"{path}: cannot read ({e})"], str(path)) from None
    if not text.strip():
        raise ParamsError([f"{path}: file is empty; expected the sections {', '.join(Params.model_fields)}"], str(path))
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError([f"{path}: not valid YAML{where}: {problem}"], str(path)) from None
    if data is None:
        raise ParamsError([f"{path}: file has no content; expected the sections {', '.join(Params.model_fields)}"], str(path))
    if not isinstance(data, dict):
        raise ParamsError([f"{path}: top level must be a mapping of sections (got {_fmt_value(data)})"], str(path))
    if "extends" in data:
        base_ref = data.pop("extends")
        if not isinstance(base_ref, str):
            raise ParamsError([f"extends: must be a path to a params file (got {_fmt_value(base_ref)})"], str(path))
        target = path.parent / base_ref
        if not target.exists():
            raise ParamsError([f"{path}: extends: {base_ref!r} points to {target}, which does not exist"], str(path))
        base = read_params_file(target, _seen + (path.resolve(),))
        data = _deep_merge(base, data)
    return data


def validate_params(data: dict[str, Any], source: str | None = None) -> Params:
    """Validate a params dict; raises ParamsError listing every problem."""
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        problems = _format_errors(e)
    valid = {}
    for name, field in Params.model_fields.items():
        if isinstance(data.get(name), dict):
            try:
                valid[name] = field.annotation.model_validate(data[name])
            except ValidationError:
                pass
    for key, msg, value in _cross_section_problems(valid):
        line = f"{key}: {msg} (got {_fmt_value(value)})"
        if line not in problems:
            problems.append(line)
    raise ParamsError(problems, source)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises :class:`ParamsError` listing every problem."""
    return validate_params(read_params_file(path), str(path))
