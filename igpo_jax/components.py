"""Building the parts of a run from its config: mesh, data, policy + tokenizer, search back-end.

Shared by `train` and `evaluate`, so both read a config the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from flax import nnx

from igpo_jax.data import examples as examples_lib, tfds as tfds_lib, world
from igpo_jax.runtime import compilation_cache, distributed, host_memory, sharding, xla_flags
from igpo_jax.rollout.episodes import RolloutConfig
from igpo_jax.model import embedded, tokenizer as tokenizer_lib, weights
from igpo_jax.model.qwen import abstract_decoder
from igpo_jax.rollout.sampler import SamplingParams
from igpo_jax.search.clients import BlockingSearchClient, make_search_client


def mesh_and_rules(config: ml_collections.ConfigDict):
    mesh = sharding.make_mesh(dict(config.mesh.shape))
    rules = {**sharding.DEFAULT_RULES, **dict(config.mesh.rules)}
    return mesh, rules


@dataclasses.dataclass(frozen=True)
class DataFiles:
    train: tuple[str, ...]  # parquet paths, or tfds.TfdsSource entries (load_examples reads both)
    test: tuple[str, ...]
    corpus: str  # '' unless the run serves its own corpus


def world_arguments(data_config) -> dict:
    """build_world's / write_world's arguments from a config's `data` (a ConfigDict, or the dict
    of a run's config.json: runs from before question kinds or world shapes existed ask every
    kind of the default shape)."""
    shape = data_config.get("world_shape", None)
    return dict(seed=data_config["world_seed"], num_questions=data_config["world_questions"],
                two_hop_fraction=data_config["world_two_hop_fraction"],
                test_fraction=data_config["world_test_fraction"],
                question_kinds=tuple(data_config.get("world_question_kinds", ())),
                shape=world.WorldShape(**dict(shape)) if shape else world.WorldShape())


def data_files(config: ml_collections.ConfigDict) -> DataFiles:
    """The run's parquet files; the embedded world is written into run_dir/world when asked for."""
    if config.data.synthetic_world:
        out = os.path.join(config.run_dir, "world")
        write = lambda: world.write_world(out, **world_arguments(config.data))
        # Multi-host: one writer, so that no process reads a file another is rewriting; a process
        # that does not see its files afterwards (run_dir not shared) writes its own identical copy.
        files = write() if jax.process_index() == 0 else None
        distributed.barrier("igpo_jax: synthetic world written")
        if files is None:
            written = world.WorldFiles(*(Path(out) / name for name in ("train.parquet", "test.parquet", "corpus.jsonl")))
            files = written if all(p.exists() for p in dataclasses.astuple(written)) else write()
        return DataFiles((str(files.train),), (str(files.test),), str(files.corpus))
    split = lambda s: tuple(p for p in (x.strip() for x in s.split(",")) if p)
    if config.data.get("tfds") is not None and config.data.tfds.name:  # a TFDS dataset instead (optional)
        train, test = tfds_lib.sources_from_config(config.data.tfds)
        return DataFiles(train, test or split(config.data.test_files), config.search.serve_corpus)
    return DataFiles(split(config.data.train_files), split(config.data.test_files), config.search.serve_corpus)


def load_examples(files: tuple[str, ...], limit: int = 0) -> tuple[examples_lib.Example, ...]:
    """The examples of a run's files, in order: parquet paths, or TFDS sources (each reader's own
    module; `tensorflow_datasets` is imported only when a TFDS source is read)."""
    examples = []
    for source in files:
        if isinstance(source, tfds_lib.TfdsSource):
            examples.extend(tfds_lib.load_examples(source))
        else:
            examples.extend(examples_lib.load_examples(source))
    examples = tuple(examples)
    return examples[:limit] if limit else examples


def model_path(config: ml_collections.ConfigDict) -> str:
    return config.model.path or embedded.smollm2_gguf_path()


def load_policy(config: ml_collections.ConfigDict, mesh=None, rules=None, path: str | None = None):
    """(model, tokenizer) from the config's checkpoint, created directly in its shardings."""
    path = path or model_path(config)
    model = weights.load(path, mesh, rules, param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                         remat=config.model.remat, scan_layers=config.model.scan_layers, attention=config.model.attention,
                         attention_block=config.model.attention_block,
                         gpu_fused_attention=config.model.gpu_fused_attention,
                         logprob_temperature=logprob_temperature(config))
    return model, tokenizer_lib.load_tokenizer(path)


def logprob_temperature(config: ml_collections.ConfigDict) -> float:
    """The temperature of the policy's log-probs: the rollouts' sampling temperature when
    `actor.temper_logprobs` (greedy rollouts, temperature 0, have none: 1)."""
    t = config.rollout.temperature
    return t if config.actor.temper_logprobs and t > 0 else 1.0


def frozen_copy(model):
    """A copy of `model` with its own buffers (same shardings): the reference policy. Sharing the
    policy's arrays would not do, since the update donates them.

    With float32 master weights and a lower compute dtype the copy is stored in the compute dtype:
    every weight is cast to it before use anyway, so its log-probs are the same, for half the bytes."""
    cfg = model.cfg
    if cfg.param_dtype != cfg.dtype:
        return in_dtype(model, cfg.dtype)  # astype: new buffers
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _copied(state))


@jax.jit
def _copied(state):
    """New buffers for every leaf, as one program (eager copies would be one per leaf shape, each
    compiled or read from the cache at every start)."""
    return jax.tree.map(jnp.copy, state)


def in_dtype(model, dtype: str | None, view=None):
    """`model` with its params and compute in `dtype` (same shardings), for sampling; `model`
    itself when `dtype` is None or already both of its dtypes. Pass the previous `view` to refresh
    it in place (a sampler holds on to it).

    veRL's rollout engine samples from bf16 weights as well; on the dev CPU (avx512_bf16) a bf16
    copy decodes about 1.5× as fast as fp32 weights (bench.sampling). Scoring and the update keep
    the policy's own dtype: π_old is recomputed from the policy, not taken from the sampler."""
    cfg = model.cfg
    if dtype is None or cfg.param_dtype == cfg.dtype == dtype:
        return model
    if view is None:
        view = abstract_decoder(cfg.replace(param_dtype=dtype, dtype=dtype))
    state = nnx.state(model)
    nnx.update(view, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  state))
    return view


def rollout_config(config: ml_collections.ConfigDict, validation: bool = False) -> RolloutConfig:
    r = config.rollout
    sampling = (SamplingParams(temperature=r.val_temperature) if validation
                else SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k))
    return RolloutConfig(dialect=r.dialect, system_prompt=r.system_prompt,
                         example_turns=tuple(tuple(pair) for pair in r.example_turns), forced_prefix=r.forced_prefix,
                         first_turn_prefix=r.first_turn_prefix,
                         last_turn_prefix=r.last_turn_prefix, max_turns=r.max_turns,
                         max_new_tokens=r.max_new_tokens, cache_size=validation and r.val_context_length or r.context_length,
                         sampling=sampling,
                         max_tool_tokens=r.max_tool_tokens, overlap_search=r.overlap_search,
                         steps_per_call=r.steps_per_call, min_span=r.min_span, today=r.today,
                         share_prompt_prefill=r.share_prompt_prefill, max_concurrent_rows=r.max_concurrent_rows,
                         append_gather_divisor=r.append_gather_divisor,
                         lockstep_turns=validation and r.val_lockstep_turns)


@contextlib.contextmanager
def search_backend(config: ml_collections.ConfigDict, corpus: str = "") -> Iterator[BlockingSearchClient]:
    """The search client; with a corpus, the embedded retriever runs on 127.0.0.1 meanwhile."""
    with contextlib.ExitStack() as stack:
        base_url = config.search.base_url or None
        if corpus and config.search.engine == "local" and not config.search.mock_mode:
            from igpo_jax.search.server import RetrieverServer

            server = stack.enter_context(RetrieverServer.from_corpus(corpus, host="127.0.0.1", port=0))
            base_url = server.url
        client = BlockingSearchClient(make_search_client(
            config.search.engine, mock=config.search.mock_mode or None, base_url=base_url,
            top_k=config.search.top_k, timeout_s=config.search.timeout_s,
            max_concurrency=config.search.max_concurrency, max_retries=config.search.max_retries,
            cache_path=config.search.cache_path or None))
        stack.callback(client.close)
        yield client


def start_program() -> None:
    """What every entry point does first: quiet logs unless asked, the CPU memory flags (before
    any JAX operation starts a backend), the persistent compilation cache (before anything
    compiles; `compilation_cache.py`), then the multi-host process group (a no-op for one)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
    xla_flags.add_cpu_memory_flags()
    compilation_cache.enable()
    host_memory.configure()
    distributed.initialize()  # from flags / SLURM / TPU VM
