"""Every option of a training run, with the defaults of the paper / reference where one exists.

Experiment files in `configs/` start from `base_config()` and override what they change.
Keys keep the reference's names (`n`, `gamma`, `info_gain_type`, `kl_coef`, `save_freq`, …) so
that its scripts translate line by line; `validate` names the key and the allowed values of a
bad setting before anything expensive starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os

import ml_collections

from igpo_jax.data.world import WorldShape
from igpo_jax.rollout.episodes import STOP_STRINGS, check_example_turns, check_turn_prefixes
from igpo_jax.igpo.advantages import IG_NORM_SCOPES, NORM_MODES
from igpo_jax.igpo.group_filter import METRICS as FILTER_GROUPS_METRICS
from igpo_jax.igpo.loss import AGG_MODES, KL_ESTIMATORS
from igpo_jax.igpo.scoring import DEFAULT_PSEUDO_TURN_TEMPLATE

DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.run_dir = "runs/default"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF model dir or .gguf file; '' → the embedded SmolLM2-135M-Instruct GGUF
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = False
    # the update's, scoring's and π_ref's forwards run the layers as one lax.scan over their stacked
    # weights (model/qwen.py, scan_layers): one layer body per program, and each layer's weight
    # gradients finished inside its own iteration (XLA then cannot hold many layers' MLP operands)
    c.model.scan_layers = False
    # bf16/fp16 param_dtype is refused for training (see validate): AdamW moves a weight by ~lr per
    # step, far below a bf16 weight's rounding step, so the updates round away. True opts in anyway.
    c.model.allow_low_precision_params = False
    # Attention kernel (igpo_jax/model/blockwise_attention.py). 'dense': [T, S] scores per layer
    # (query-chunked, model attention_chunk). 'blockwise': flash-style, scores recomputed in the
    # backward, O(length) memory (what a 32k-token row needs); blocks of attention_block queries
    # × attention_block keys. Measured on the 2-core dev CPU (one attention layer, fwd + bwd):
    # backward temp memory at 8k tokens 636 MiB dense (1538 MiB unchunked) vs 15 MiB blockwise;
    # SmolLM2-width layer, 4 rows: T=512 1.21 s dense vs 0.94 s blockwise(256), T=2048 19.3 s vs
    # 11.5 s. The base default stays 'dense' so the CPU demo keeps the numerics its benchmarks were
    # measured with; accelerator configs (long rows) set 'blockwise'. (Read by the planner:
    # activation memory per layer ∝ T·S with 'dense', ∝ T·attention_block with 'blockwise'.)
    c.model.attention = "dense"
    c.model.attention_block = 512
    # With attention='blockwise', on an NVIDIA GPU: the attentions whose mask cuDNN's fused kernel
    # takes (the update's and π_old/π_ref forwards over right-padded, unpacked rows without shared
    # prefixes; bf16/fp16 compute) run jax.nn.dot_product_attention(implementation='cudnn'); packed
    # segments, caches, the IG copies and every other backend keep the blockwise kernel
    # (igpo_jax/model/fused_attention.py). Off: blockwise everywhere. CPU and TPU runs ignore it.
    c.model.gpu_fused_attention = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = {"data": -1}  # named axes; one -1 takes the remaining devices
    c.mesh.rules = ml_collections.ConfigDict()  # logical axis → mesh axis overrides (see sharding.py)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated parquet files in the reference's format
    c.data.test_files = ""
    # Or a prepared TensorFlow Datasets dataset (optional: `pip install tensorflow-datasets`, no
    # TensorFlow needed; prepared as array_record). See igpo_jax/data/tfds.py.
    c.data.tfds = ml_collections.ConfigDict()
    c.data.tfds.name = ""  # 'name[/config][:version]'; set → train questions come from it, not train_files
    c.data.tfds.data_dir = ""  # '' → TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.tfds.train_split = "train"  # TFDS split syntax: 'train', 'train[:90%]', …
    c.data.tfds.test_split = ""  # e.g. 'validation[:500]'; '' → the test set is test_files (or none)
    # example field=TFDS feature path ('/' for nested features), comma-separated, e.g.
    # 'question=question,golden_answers=answer/aliases,index=id'. Fields: question | prompt (one),
    # golden_answers (a string joined by '<|answer_split|>', or a sequence), data_source (unset → the
    # dataset's name), ability, answer_style, index (unset → row number), split (unset → split name).
    # '' → the reference's layout: data_source, prompt, ability, reward_model/*, extra_info/*.
    c.data.tfds.fields = ""
    c.data.synthetic_world = False  # generate the embedded world into run_dir/world instead
    c.data.world_seed = 0
    c.data.world_questions = 400
    c.data.world_two_hop_fraction = 0.5  # the rest are one-hop
    c.data.world_test_fraction = 0.1  # held-out questions: about entities no training question asks about
    # the question kinds asked (names from igpo_jax.data.world.QUESTION_KINDS, e.g. "person.birthplace"); () = all
    c.data.world_question_kinds = ()
    # how many entities of each kind, and distractor namesake companies (igpo_jax.data.world.WorldShape)
    c.data.world_shape = ml_collections.ConfigDict(dataclasses.asdict(WorldShape()))
    c.data.train_batch_size = 32  # questions per step
    c.data.val_batch_size = 32
    c.data.val_max_questions = 0  # 0 → the whole test set
    c.data.shuffle = True

    c.search = ml_collections.ConfigDict()
    c.search.engine = "local"  # 'google' | 'bing' | 'local' | 'mock'
    c.search.mock_mode = False
    c.search.base_url = ""  # '' → the engine's default (local: the embedded retriever when served)
    c.search.serve_corpus = ""  # start the embedded retriever on this JSONL corpus (world: automatic)
    c.search.top_k = 10
    c.search.timeout_s = 20.0
    c.search.max_concurrency = 32
    c.search.max_retries = 3
    c.search.cache_path = ""

    c.rollout = ml_collections.ConfigDict()
    c.rollout.n = 16  # agent_grpo.n: rollouts per question (the group)
    c.rollout.dialect = "qwen_tool_call"
    c.rollout.forced_prefix = "<think>"
    c.rollout.first_turn_prefix = ml_collections.config_dict.placeholder(str)  # turn 0 only; unset: forced_prefix
    # the final allowed turn (max_turns − 1) only, e.g. '<answer>' after free turns (forced_prefix '')
    # in which the policy chooses to search again or answer; unset: forced_prefix
    c.rollout.last_turn_prefix = ml_collections.config_dict.placeholder(str)
    c.rollout.system_prompt = ml_collections.config_dict.placeholder(str)
    c.rollout.example_turns = ()  # (question, assistant response) pairs, chat turns before the question
    c.rollout.max_turns = 10
    c.rollout.max_new_tokens = 2000  # per turn
    c.rollout.max_tool_tokens = 512
    c.rollout.context_length = 32768  # KV-cache slots
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.val_temperature = 0.0  # validation is greedy
    # validation: a row that stops waits for the turn's last row, then the turn's searches go out
    # in one round and its continuations in one append (rollout.RolloutConfig.lockstep_turns);
    # same episodes, fewer appends and compiled programs when a wide batch's rows stop apart
    c.rollout.val_lockstep_turns = False
    # validation's KV-cache slots (0 → context_length): a greedy batch whose episodes are known to
    # be short can attend over (and hold) fewer slots; a row that does not fit ends at 'context'
    c.rollout.val_context_length = 0
    c.rollout.overlap_search = True  # False: a deterministic decode/append schedule (bitwise resumable)
    c.rollout.steps_per_call = 32
    # decode attends over the smallest power-of-two window of the cache that holds every slot,
    # at least this many: smaller → less attention work early in an episode, more compiled spans
    c.rollout.min_span = 1024
    # prefill a group's prompt once and copy its KV entries into the G rows (off: one prefill per row)
    c.rollout.share_prompt_prefill = True
    # an append (a search result) fed to ≤ rows / this rows extends only those rows (a gathered
    # sub-batch) instead of the whole batch: faster, but the gathered rows' cache is copied for
    # the call; 2 suits a wide validation batch with memory to spare, 8 keeps the demo under 6 GiB
    c.rollout.append_gather_divisor = 8
    # at most this many rollouts decode at once (the KV cache's rows, hence its bytes with
    # context_length); a finished episode's row goes to the next waiting one. 0 → all at once
    c.rollout.max_concurrent_rows = 0
    # sample from a copy of the policy in this dtype (e.g. "bfloat16", as veRL's vLLM rollouts do);
    # unset: sample from the policy itself. Scoring and the update keep the policy's dtype.
    c.rollout.dtype = ml_collections.config_dict.placeholder(str)
    # the system prompt's {today} (ISO date); unset: the day the run starts. configs/ pin it, so
    # that a run's prompts (and hence its rollouts) are the same on any day.
    c.rollout.today = ml_collections.config_dict.placeholder(str)

    c.algorithm = ml_collections.ConfigDict()
    c.algorithm.use_info_gain = True
    c.algorithm.info_gain_type = "prob_diff"
    c.algorithm.info_gain_norm_mode = "joint"
    c.algorithm.norm_adv_by_std_in_grpo = True
    c.algorithm.gamma = 1.0
    # Curriculum (IGPO_SPEC §3): weights on the raw F1 and IG rewards, linear from *_init at step 1
    # to *_final at the last step, applied before group normalisation. So it acts only where F1 and
    # IG share a statistic: 'joint' (it shifts their relative scale in the pooled mean/std), or
    # without std division (norm_adv_by_std_in_grpo=False: it scales each part). In 'separate' mode
    # and in GRPO with std division each weight cancels (a z-score is scale-free): refused there.
    c.algorithm.use_curriculum = False
    c.algorithm.curriculum_f1_init = 0.5
    c.algorithm.curriculum_f1_final = 1.0
    c.algorithm.curriculum_ig_init = 1.0
    c.algorithm.curriculum_ig_final = 0.5
    c.algorithm.format_penalty = -2.0
    # Controls for the credit-assignment claim (issue 33), departures from the paper, off by default.
    # IG-only (the paper's Table 3 ablation): the outcome reward left out of the advantages, which
    # then come from the information gains alone
    c.algorithm.use_outcome_reward = True
    # placebo: each group's information gains permuted among its turn slots before normalisation
    # (seeded by the run's seed and the step): the same rewards, no credit to the turn that earned one
    c.algorithm.shuffle_info_gain = False
    # Over what the gains are normalised ('separate' and IG-only): 'group' (the paper's: all turns of
    # the group's rollouts pooled) or 'turn' (each turn position over the group's rollouts: a group of
    # identical rollouts then gets no IG advantage); and a floor under the gains' std (nats for
    # log_prob_diff; 0: none), so that a noise-level spread is not z-scored to ±1 (issue 33)
    c.algorithm.info_gain_norm_scope = "group"
    c.algorithm.info_gain_std_floor = 0.0
    c.algorithm.pseudo_turn_template = DEFAULT_PSEUDO_TURN_TEMPLATE
    c.algorithm.scoring_batch_size = 8
    # Dynamic sampling (DAPO; veRL's algorithm.filter_groups, same key names): a group whose
    # rollouts carry no signal by `metric` is dropped and the next questions of the data are rolled
    # out, round after round, until the step has train_batch_size informative groups or
    # max_num_gen_batches rounds have run; then the remaining slots hold dropped groups (their
    # advantages are 0: no policy gradient) so that the update batch keeps its shape, and
    # filter_groups/* say how many rounds and groups the step used (cap_hit: it ran out of rounds).
    # A departure from the paper (its GRPO and IGPO train on every group): off by default.
    # metric (igpo/group_filter.py): 'advantage' drops groups whose advantages are 0 on every token
    # (GRPO: the outcome rewards tie; IGPO: the turn rewards tie); 'acc' groups whose exact match
    # ties; 'score' (= 'seq_final_reward' = 'seq_reward' here: no token-level shaping, no KL in the
    # reward) groups whose outcome rewards tie, also where IGPO's gains differ.
    # max_num_gen_batches: the most rounds a step runs, its first included (veRL's name; its
    # DAPO recipe uses 10); 0 → one pass over the training data, veRL's "no limit" made finite.
    # Extra rounds read the data iterator's next batches (a step may use several) and sample with
    # seeds of their own; each process fills its own share of the batch (train.py).
    c.algorithm.filter_groups = ml_collections.ConfigDict()
    c.algorithm.filter_groups.enable = False
    c.algorithm.filter_groups.metric = "advantage"
    c.algorithm.filter_groups.max_num_gen_batches = 10

    c.actor = ml_collections.ConfigDict()
    c.actor.lr = 1e-6
    c.actor.weight_decay = 0.01
    c.actor.grad_clip = 1.0
    c.actor.warmup_steps = 0
    # 'constant' or 'cosine': after the warm-up, cosine decays to 0 at the run's last optimiser step
    c.actor.lr_schedule = "constant"
    c.actor.ppo_mini_batch_size = 0  # rollouts per optimiser step; 0 → all of a step's rollouts
    c.actor.micro_batch_size = 0  # rollouts per forward/backward; 0 → the mini-batch
    # token budget per device of a packed micro-batch (the reference's ppo_max_token_len_per_gpu
    # with dynamic batch size): rows are packed, with segment ids, into micro-batches of this many
    # tokens (igpo_jax/training/packing.py), so padding costs no FLOPs; 0 → padded micro-batches
    c.actor.max_tokens_per_micro_batch = 0
    c.actor.ppo_epochs = 1
    c.actor.clip_ratio_low = 0.2
    c.actor.clip_ratio_high = 0.2
    c.actor.clip_ratio_c = 3.0
    c.actor.use_kl_loss = True
    c.actor.kl_coef = 0.001
    c.actor.kl_loss_type = "low_var_kl"
    c.actor.entropy_coeff = 0.0
    c.actor.loss_agg_mode = "seq-mean-token-mean"
    # C of loss_agg_mode 'seq-mean-token-sum-norm' (each rollout's token sum / C, veRL's name): a
    # constant, so the gradient's scale does not change with a batch's longest row; 0 → the most
    # tokens a policy generates in an episode, rollout.max_turns × rollout.max_new_tokens
    c.actor.loss_scale_factor = 0.0
    # π_old by a forward of the policy even where it is not needed: a one-step update's π_old is
    # π_θ itself, and with IG on the scoring pass's log-probs are π_old's (train.old_logp_source)
    c.actor.recompute_old_logp = False
    # the update's forwards and backward compute each group's prompt once for its rollout.n rows
    # (its keys/values shared by them); needs mini- and micro-batches of whole groups, else off.
    # The IG scoring pass likewise computes the prompt its micro-batch's rows share once (dense attention)
    c.actor.share_prompt_prefix = True
    # rollouts of a group that are the same conversation (same tokens, turns and advantages) are
    # computed once, in the IG scoring, π_old, π_ref and the update, weighted by their number: the
    # same rewards, loss and gradients (training/row_selection.py)
    c.actor.dedup_rows = True
    # with the KL and entropy terms off, rows whose advantage is 0 on every token are not computed
    # in the update (they add exactly nothing; the loss's normaliser still counts them)
    c.actor.skip_rows_without_gradient = True
    # π's log-probs of logits / rollout.temperature (veRL's actor): the policy the rollouts sampled
    # from, so the policy gradient is that policy's; False: of the raw logits (temperature 1)
    c.actor.temper_logprobs = True

    c.trainer = ml_collections.ConfigDict()
    c.trainer.total_training_steps = 60
    # end the run at the step whose generated rollouts (questions drawn from the data × rollout.n,
    # dynamic sampling's extra rounds included) reach this many: arms compared at equal generation
    # (e.g. GRPO with algorithm.filter_groups against GRPO); that step validates and checkpoints as
    # a last step does. 0: total_training_steps alone ends the run
    c.trainer.rollout_budget = 0
    c.trainer.save_freq = 10
    c.trainer.test_freq = 10
    c.trainer.val_before_train = False  # validate the initial policy first (written as step 0)
    c.trainer.max_checkpoints = 3
    c.trainer.use_tensorboard = True
    c.trainer.use_wandb = False
    # write rollout samples (RUN_DIR/samples/step_NNNNNN.jsonl) every this many steps, and at
    # every validation step; 0: at validation steps only
    c.trainer.sample_freq = 0
    c.trainer.progress = True  # tqdm bars; False (or env IGPO_PROGRESS=0) for quiet runs and tests
    return c


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """get_config() of `name`.py in the folder of `config_file`: a config that is another with a
    few changes (world_grpo is world_igpo without information gain) says so in one line."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config {path!r} next to {config_file!r}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"config.{key}={value!r} must be {'≥ 0' if zero_ok else '> 0'}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Fail fast, naming the key, on settings that would otherwise fail deep inside a step."""
    _one_of("rollout.dialect", c.rollout.dialect, STOP_STRINGS)
    _one_of("algorithm.info_gain_type", c.algorithm.info_gain_type, ("prob_diff", "log_prob_diff"))
    _one_of("algorithm.info_gain_norm_mode", c.algorithm.info_gain_norm_mode, NORM_MODES)
    for key in ("use_outcome_reward", "shuffle_info_gain"):
        _one_of(f"algorithm.{key}", c.algorithm[key], (False, True))
    if not c.algorithm.use_info_gain and (not c.algorithm.use_outcome_reward or c.algorithm.shuffle_info_gain):
        raise ValueError("config.algorithm.use_outcome_reward=False (IG-only) and config.algorithm.shuffle_info_gain="
                         "True (placebo) act on information gains: they need config.algorithm.use_info_gain=True")
    pooled = c.algorithm.use_info_gain and c.algorithm.info_gain_norm_mode == "joint"
    if c.algorithm.use_curriculum and c.algorithm.norm_adv_by_std_in_grpo and not pooled:
        raise ValueError(
            "config.algorithm.use_curriculum=True has no effect here: its weights scale the F1 and IG rewards "
            "before group normalisation, and with " + ("info_gain_norm_mode='separate'" if c.algorithm.use_info_gain
                                                       else "use_info_gain=False (GRPO)") +
            " and norm_adv_by_std_in_grpo=True each reward type is divided by its own std, so a weight cancels. "
            "Use info_gain_norm_mode='joint', or norm_adv_by_std_in_grpo=False, or no curriculum")
    _one_of("algorithm.info_gain_norm_scope", c.algorithm.info_gain_norm_scope, IG_NORM_SCOPES)
    _positive("algorithm.info_gain_std_floor", c.algorithm.info_gain_std_floor, zero_ok=True)
    departs = c.algorithm.info_gain_norm_scope != "group" or c.algorithm.info_gain_std_floor
    if departs and (not c.algorithm.use_info_gain or (c.algorithm.use_outcome_reward
                                                      and c.algorithm.info_gain_norm_mode == "joint")):
        raise ValueError("config.algorithm.info_gain_norm_scope and info_gain_std_floor act on the information gains' "
                         "own normalisation: they need use_info_gain=True and info_gain_norm_mode='separate' "
                         "(or the IG-only use_outcome_reward=False)")
    if c.algorithm.info_gain_std_floor and not c.algorithm.norm_adv_by_std_in_grpo:
        raise ValueError("config.algorithm.info_gain_std_floor bounds the std the gains are divided by; with "
                         "norm_adv_by_std_in_grpo=False nothing is divided: leave it 0")
    _validate_filter_groups(c)
    _one_of("actor.kl_loss_type", c.actor.kl_loss_type, KL_ESTIMATORS)
    _one_of("actor.loss_agg_mode", c.actor.loss_agg_mode, AGG_MODES)
    _one_of("search.engine", c.search.engine, ("google", "bing", "local", "mock"))
    for dtype_key in ("param_dtype", "dtype"):
        _one_of(f"model.{dtype_key}", c.model[dtype_key], DTYPES)
    if c.model.param_dtype != "float32" and not c.model.allow_low_precision_params:
        raise ValueError(
            f"config.model.param_dtype={c.model.param_dtype!r} would not train: AdamW changes a weight by "
            f"about lr ({c.actor.lr:g}) per step, far below a {c.model.param_dtype} weight's rounding step "
            f"(≈ 1.2e-4 at |w| = 0.02 in bfloat16), so the updates round away. Keep float32 master weights "
            f"with {c.model.param_dtype} compute (model.param_dtype='float32', "
            f"model.dtype={c.model.param_dtype!r}), or set model.allow_low_precision_params=True to opt in")
    _one_of("model.attention", c.model.attention, ("dense", "blockwise"))
    _positive("model.attention_block", c.model.attention_block)
    _one_of("model.gpu_fused_attention", c.model.gpu_fused_attention, (False, True))
    _one_of("model.scan_layers", c.model.scan_layers, (False, True))
    _one_of("actor.lr_schedule", c.actor.lr_schedule, ("constant", "cosine"))
    if c.model.gpu_fused_attention and c.model.attention != "blockwise":
        raise ValueError(f"config.model.gpu_fused_attention=True needs config.model.attention='blockwise': the "
                         f"masks cuDNN does not take (packed segments, caches, the IG copies) and every backend "
                         f"but an NVIDIA GPU run that kernel; got config.model.attention={c.model.attention!r}")
    if c.rollout.dtype is not None:
        _one_of("rollout.dtype", c.rollout.dtype, DTYPES)
    _positive("rollout.append_gather_divisor", c.rollout.append_gather_divisor)
    if not isinstance(c.rollout.max_concurrent_rows, int) or c.rollout.max_concurrent_rows < 0:
        raise ValueError(f"config.rollout.max_concurrent_rows={c.rollout.max_concurrent_rows!r} must be an integer "
                         f"≥ 0: the most rollouts decoding at once (0 → all train_batch_size × n of them)")
    for key in ("rollout.n", "rollout.max_turns", "rollout.max_new_tokens", "rollout.context_length",
                "rollout.min_span", "data.train_batch_size", "trainer.total_training_steps", "actor.ppo_epochs"):
        section, name = key.split(".")
        _positive(key, c[section][name])
    if not isinstance(c.rollout.val_context_length, int) or not 0 <= c.rollout.val_context_length:
        raise ValueError(f"config.rollout.val_context_length={c.rollout.val_context_length!r} must be an integer ≥ 0 "
                         f"(0 → rollout.context_length)")
    per_step = c.data.train_batch_size * c.rollout.n
    if not isinstance(c.trainer.rollout_budget, int) or not (c.trainer.rollout_budget == 0
                                                             or c.trainer.rollout_budget >= per_step):
        raise ValueError(f"config.trainer.rollout_budget={c.trainer.rollout_budget!r} must be 0 (off) or an integer "
                         f"≥ one step's rollouts (data.train_batch_size × rollout.n = {per_step})")
    for key in ("trainer.save_freq", "trainer.test_freq", "trainer.sample_freq", "actor.ppo_mini_batch_size",
                "actor.micro_batch_size", "actor.max_tokens_per_micro_batch", "actor.lr", "rollout.temperature",
                "actor.loss_scale_factor"):
        section, name = key.split(".")
        _positive(key, c[section][name], zero_ok=True)
    check_turn_prefixes(c.rollout.first_turn_prefix, c.rollout.last_turn_prefix, c.rollout.max_turns,
                        keys="config.rollout.first_turn_prefix and config.rollout.last_turn_prefix")
    check_example_turns(c.rollout.example_turns, key="config.rollout.example_turns")  # before any model loads
    if not 0 <= c.algorithm.gamma <= 1:
        raise ValueError(f"config.algorithm.gamma={c.algorithm.gamma} must lie in [0, 1]")
    if c.rollout.today is not None:
        try:
            datetime.date.fromisoformat(c.rollout.today)
        except ValueError:
            raise ValueError(f"config.rollout.today={c.rollout.today!r} must be an ISO date (YYYY-MM-DD)") from None
    if "{answer}" not in c.algorithm.pseudo_turn_template:
        raise ValueError("config.algorithm.pseudo_turn_template must contain '{answer}'")
    budget = c.actor.max_tokens_per_micro_batch
    if 0 < budget < c.rollout.context_length:
        raise ValueError(f"config.actor.max_tokens_per_micro_batch={budget} is below rollout.context_length="
                         f"{c.rollout.context_length}: a packed micro-batch must hold the longest row")
    rollouts = c.data.train_batch_size * c.rollout.n
    mini = c.actor.ppo_mini_batch_size or rollouts
    micro = c.actor.micro_batch_size or mini
    if rollouts % mini or mini % micro:
        raise ValueError(f"config.actor.ppo_mini_batch_size={mini} must divide train_batch_size × n = {rollouts}, "
                         f"and config.actor.micro_batch_size={micro} must divide it")
    _validate_data_source(c.data)


def _validate_filter_groups(c: ml_collections.ConfigDict) -> None:
    f = c.algorithm.filter_groups
    _one_of("algorithm.filter_groups.enable", f.enable, (False, True))
    _one_of("algorithm.filter_groups.metric", f.metric, FILTER_GROUPS_METRICS)
    if not isinstance(f.max_num_gen_batches, int) or isinstance(f.max_num_gen_batches, bool) \
            or f.max_num_gen_batches < 0:
        raise ValueError(f"config.algorithm.filter_groups.max_num_gen_batches={f.max_num_gen_batches!r} must be an "
                         f"integer ≥ 0: the most generation rounds a step runs (0 → one pass over the data)")
    if f.enable and c.rollout.n < 2:
        raise ValueError(f"config.algorithm.filter_groups.enable=True needs rollout.n ≥ 2 (got {c.rollout.n}): "
                         f"a group of one rollout has nothing to compare, so no group would be informative")


def _validate_data_source(d: ml_collections.ConfigDict) -> None:
    tfds = d.get("tfds")
    if tfds is not None and tfds.name:
        # Checks the field mapping only; tensorflow_datasets is not imported here.
        from igpo_jax.data import tfds as tfds_lib

        tfds_lib.parse_fields(tfds.fields)
        for key, value in (("data.train_files", d.train_files), ("data.synthetic_world", d.synthetic_world)):
            if value:
                raise ValueError(f"config.data.tfds.name={tfds.name!r} and config.{key}={value!r} "
                                 f"both name the training data; set one")
        if not tfds.train_split:
            raise ValueError("config.data.tfds.train_split is empty")
        if tfds.test_split and d.test_files:
            raise ValueError(f"config.data.tfds.test_split={tfds.test_split!r} and "
                             f"config.data.test_files={d.test_files!r} both name the test data; set one")
    elif d.synthetic_world:
        fields = {f.name for f in dataclasses.fields(WorldShape)}
        unknown = sorted(set(d.world_shape) - fields)
        if unknown:
            raise ValueError(f"config.data.world_shape has unknown key(s) {unknown}; expected {sorted(fields)}")
    if not d.synthetic_world and not d.train_files and not (tfds is not None and tfds.name):
        raise ValueError("set config.data.train_files (parquet), config.data.tfds.name (TFDS) "
                         "or config.data.synthetic_world=True")
