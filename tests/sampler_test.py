"""The sampler: greedy equals transformers' generate, sampling options, stops, append-and-continue."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from igpo_jax.model.qwen import forward_padded
from igpo_jax.model.weights import load_hf
from igpo_jax.rollout.sampler import FINISH_LENGTH, FINISH_STOP, Sampler, SamplingParams, sample_tokens
from tests.conftest import write_tiny_hf_model

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 12], [100, 2, 33, 4, 9]]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    hf = write_tiny_hf_model("qwen2", path)
    return hf, load_hf(str(path))


def _hf_greedy(hf, prompts, new_tokens, eos=None, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad)
    return out[:, width:].tolist()


def test_greedy_matches_transformers_generate_on_a_ragged_batch(tiny):
    hf, model = tiny
    ours = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY, steps_per_call=8)
    out = ours.generate(PROMPTS, seeds=[0, 1, 2], max_new_tokens=20)
    assert [o.tokens for o in out] == _hf_greedy(hf, PROMPTS, 20)
    assert all(o.finish_reason == FINISH_LENGTH for o in out)


def test_greedy_matches_transformers_on_smollm2_chat_prompts(smollm2, smollm2_tokenizer):
    from bench.common import reference_smollm2
    from igpo_jax.model.tokenizer import stop_token_ids

    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write one sentence about the sea, then stop."]
    prompts = [smollm2_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                     add_generation_prompt=True)["input_ids"] for q in questions]
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ours = Sampler(smollm2, smollm2_tokenizer, batch_size=3, cache_size=128, params=GREEDY,
                   stop_token_ids=stop_token_ids(smollm2_tokenizer))
    out = ours.generate(prompts, seeds=[0, 0, 0], max_new_tokens=24)
    ref = _hf_greedy(reference_smollm2(), prompts, 24, eos=eos, pad=smollm2_tokenizer.pad_token_id)
    for o, r in zip(out, ref):
        expected = r[:r.index(eos) + 1] if eos in r else r
        assert o.tokens == expected
        assert o.finish_reason == (FINISH_STOP if eos in r else FINISH_LENGTH)


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50))
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    argmax = np.asarray(logits.argmax(-1))
    np.testing.assert_array_equal(sample_tokens(logits, keys, SamplingParams(temperature=0.0)), argmax)
    np.testing.assert_array_equal(sample_tokens(logits, keys, SamplingParams(temperature=0.7, top_k=1)), argmax)
    # a vanishing temperature concentrates all mass on the argmax as well
    np.testing.assert_array_equal(sample_tokens(logits, keys, SamplingParams(temperature=1e-4)), argmax)


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.75 keeps exactly the first two
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)).repeat(400, 0)
    keys = jax.random.split(jax.random.PRNGKey(3), 400)
    drawn = np.asarray(sample_tokens(logits, keys, SamplingParams(temperature=1.0, top_p=0.75)))
    assert set(drawn.tolist()) == {0, 1}
    assert 0.5 < (drawn == 0).mean() < 0.75  # renormalised 0.5/0.8 = 0.625
    drawn_k = np.asarray(sample_tokens(logits, keys, SamplingParams(temperature=1.0, top_k=3)))
    assert set(drawn_k.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_threshold_keeps_the_same_nucleus_as_sorting(top_p):
    from igpo_jax.rollout.sampler import top_p_threshold

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 3000)).astype(np.float32) * 3
    logits[0, :10] = logits[0, 0]  # ties straddling the cut
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    kept = probs >= np.asarray(top_p_threshold(jnp.asarray(probs), top_p))[:, None]
    for row, keep in zip(probs, kept):
        order = np.argsort(-row, kind="stable")
        mass_before = np.cumsum(row[order].astype(np.float64)) - row[order]
        cutoff = row[order][mass_before < top_p].min()  # the reference: sort, keep the prefix
        # at most the token sitting on the cut may flip, by fp32 summation order (~1e-7)
        rank_of_differences = np.flatnonzero((keep != (row >= cutoff))[order])
        assert len(rank_of_differences) <= 1
        assert all(abs(mass_before[r] - top_p) < 1e-5 for r in rank_of_differences)


def test_inverse_cdf_draws_follow_the_distribution_across_cdf_blocks():
    # 600 tokens span three CDF blocks; tokens 255 | 256 straddle the first boundary; 257–519 are empty (p = 0)
    from igpo_jax.rollout.sampler import categorical_inverse_cdf

    probs = np.zeros(600)
    probs[[3, 255, 256, 520, 599]] = [0.1, 0.2, 0.3, 0.25, 0.15]
    probs = probs / probs.sum()
    n = 20000
    logits = np.log(np.where(probs > 0, probs, 1e-45)).astype(np.float32)
    logits[probs == 0] = -np.inf
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    drawn = np.asarray(categorical_inverse_cdf(jnp.asarray(np.repeat(logits[None], n, 0)), keys))
    freq = np.bincount(drawn, minlength=600) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))  # never a zero-probability token
    np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))  # 4 σ at worst
    again = np.asarray(categorical_inverse_cdf(jnp.asarray(np.repeat(logits[None], n, 0)), keys))
    np.testing.assert_array_equal(drawn, again)


def test_fixed_seed_is_reproducible_and_independent_of_batch_composition(tiny):
    _, model = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9)
    s = Sampler(model, None, batch_size=4, cache_size=64, params=params, steps_per_call=8)
    a = [o.tokens for o in s.generate(PROMPTS, seeds=[10, 11, 12], max_new_tokens=16)]
    b = [o.tokens for o in s.generate(PROMPTS, seeds=[10, 11, 12], max_new_tokens=16)]
    assert a == b
    c = [o.tokens for o in s.generate(PROMPTS, seeds=[13, 11, 12], max_new_tokens=16)]
    assert c[0] != a[0] and c[1:] == a[1:]
    alone = s.generate([PROMPTS[1]], seeds=[11], max_new_tokens=16)[0].tokens
    assert alone == a[1]


def test_free_cache_hands_the_cache_back_and_the_next_start_samples_the_same(tiny):
    _, model = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9)
    s = Sampler(model, None, batch_size=4, cache_size=64, params=params, steps_per_call=8)
    a = [o.tokens for o in s.generate(PROMPTS, seeds=[10, 11, 12], max_new_tokens=16)]
    assert s.cache is not None
    s.free_cache()
    assert s.cache is None and s.decoding_rows() == []
    assert [o.tokens for o in s.generate(PROMPTS, seeds=[10, 11, 12], max_new_tokens=16)] == a


def test_per_row_max_new_tokens(tiny):
    _, model = tiny
    s = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY)
    out = s.generate(PROMPTS, seeds=[0, 0, 0], max_new_tokens=[3, 9, 1])
    assert [len(o.tokens) for o in out] == [3, 9, 1]


def test_stop_strings_cut_at_the_token_that_completes_them(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a short story about a cat."}],
                                     tokenize=True, add_generation_prompt=True)["input_ids"]
    free = Sampler(smollm2, tok, batch_size=1, cache_size=128, params=GREEDY).generate([prompt], [0], 30)[0].tokens
    # a stop string that spans token boundaries and ends inside the 12th generated token
    pieces = [tok.decode(free[:i]) for i in range(len(free) + 1)]
    end_token = 12
    stop = pieces[end_token][len(pieces[9]) - 2: len(pieces[end_token - 1]) + 1]
    assert stop not in pieces[end_token - 1] and len(stop) > 3
    s = Sampler(smollm2, tok, batch_size=1, cache_size=128, params=GREEDY, stop_strings=[stop])
    out = s.generate([prompt], [0], 30)[0]
    assert out.tokens == free[:end_token] and out.finish_reason == FINISH_STOP


# (rows, append_gather_divisor, the call an append to 2 rows makes): 2 rows gathered when their
# bucket (2) is ≤ rows / divisor, else the whole batch extended
@pytest.mark.parametrize("min_span", [1024, 8])  # attend over the whole cache / over growing spans
@pytest.mark.parametrize("rows,divisor,expected", [
    (16, 8, {"_extend_rows_call": [2], "_extend_call": []}),
    (4, 2, {"_extend_rows_call": [2], "_extend_call": []}),
    (4, 8, {"_extend_rows_call": [], "_extend_call": [4]}),
])
def test_append_and_continue_matches_prefilling_the_concatenation(tiny, min_span, rows, divisor, expected,
                                                                 monkeypatch):
    _, model = tiny
    s = Sampler(model, None, batch_size=rows, cache_size=128, params=GREEDY, steps_per_call=4, min_span=min_span,
                append_gather_divisor=divisor)
    first = s.generate(PROMPTS, seeds=[0, 1, 2], max_new_tokens=[5, 3, 6])
    tool = {0: [11, 12, 13], 2: [70, 71, 72, 73, 74, 75, 76]}  # ragged appends, row 1 stays done
    calls = _count_calls(monkeypatch, "_extend_rows_call", "_extend_call")
    s.append(list(tool), list(tool.values()), max_new_tokens=6)
    assert calls == expected
    cont = {}
    while s.decoding_rows():
        cont.update(s.decode())
    for r, appended in tool.items():
        full = PROMPTS[r] + first[r].tokens + appended + cont[r].tokens
        valid = np.ones((1, len(full)), bool)
        logits = np.asarray(forward_padded(model, np.asarray([full], np.int32), valid))[0]
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        start = len(PROMPTS[r]) + len(first[r].tokens) + len(appended)
        expected = [logp[start - 1 + i, t] for i, t in enumerate(cont[r].tokens)]
        np.testing.assert_allclose(cont[r].logprobs, expected, atol=1e-5)
        greedy_next = logits[start - 1:start - 1 + len(cont[r].tokens)].argmax(-1).tolist()
        assert cont[r].tokens == greedy_next


def test_an_append_gather_divisor_below_one_is_refused(tiny):
    with pytest.raises(ValueError, match="append_gather_divisor must be ≥ 1"):
        Sampler(tiny[1], None, batch_size=4, cache_size=64, append_gather_divisor=0)
    from igpo_jax import config_base

    c = config_base.base_config()
    c.rollout.append_gather_divisor = 0  # refused with the config, before any model loads
    with pytest.raises(ValueError, match=r"config.rollout.append_gather_divisor=0 must be > 0"):
        config_base.validate(c)


@pytest.mark.parametrize("min_span", [1024, 8])
def test_finished_rows_are_left_out_of_the_decode_batch(tiny, min_span):
    _, model = tiny
    s = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY, steps_per_call=4, min_span=min_span)
    s.start(PROMPTS + [[1, 2]], seeds=[0, 1, 2, 3], max_new_tokens=[2, 2, 2, 12])
    first = s.decode()
    assert set(first) == {0, 1, 2}
    before = _decode_cache_size()
    rest = {}
    while s.decoding_rows():
        rest.update(s.decode())
    assert len(rest[3].tokens) == 12
    assert _decode_cache_size() > before  # a compacted (1-row) variant was compiled and used
    full = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY).generate([[1, 2]], [3], 12)[0]
    assert rest[3].tokens == full.tokens


def test_without_gathering_the_whole_batch_decodes_with_finished_rows_masked(tiny, monkeypatch):
    """gather_decoding_rows=False: every decode call runs the whole batch (no gathered sub-batch),
    and each row samples what it does with gathering (rows are independent; the masked rows'
    cache is left as it was)."""
    from igpo_jax.rollout import sampler as sampler_lib

    _, model = tiny
    compact_flags, real = [], sampler_lib._decode_call
    monkeypatch.setattr(sampler_lib, "_decode_call", lambda *a: compact_flags.append(a[8]) or real(*a))
    prompts, budgets = PROMPTS + [[1, 2]], [2, 5, 3, 12]
    outputs = {}
    for gather in (True, False):
        compact_flags.clear()
        s = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY, steps_per_call=4, min_span=16,
                    gather_decoding_rows=gather)
        outputs[gather] = s.generate(prompts, [0, 1, 2, 3], budgets)
        assert any(compact_flags) == gather
    for a, b, n in zip(outputs[True], outputs[False], budgets):
        assert a.tokens == b.tokens and len(a.tokens) == n and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_attention_span_is_the_smallest_power_of_two_that_holds_the_call(tiny):
    _, model = tiny
    s = Sampler(model, None, batch_size=2, cache_size=128, min_span=8)
    assert [s._span(n) for n in (1, 8, 9, 33, 100, 128, 500)] == [8, 8, 16, 64, 128, 128, 128]
    assert Sampler(model, None, batch_size=2, cache_size=100)._span(3) == 100  # min_span > the cache


def _count_calls(monkeypatch, *names):
    """Record the batch size of every call to the sampler's device functions `names`."""
    from igpo_jax.rollout import sampler as sampler_lib

    calls = {name: [] for name in names}
    for name in names:
        real = getattr(sampler_lib, name)

        def counted(*args, _real=real, _name=name):
            calls[_name].append(args[4].shape[0])  # [rows in the call, width] in both signatures
            return _real(*args)
        monkeypatch.setattr(sampler_lib, name, counted)
    return calls


def _decode_cache_size():
    from igpo_jax.rollout import sampler as sampler_lib

    return sampler_lib._decode_call._cache_size()


def test_prompt_that_does_not_fit_finishes_with_context(tiny):
    _, model = tiny
    s = Sampler(model, None, batch_size=2, cache_size=24, params=GREEDY)
    out = s.generate([list(range(1, 30)), [1, 2, 3]], seeds=[0, 1], max_new_tokens=4)
    assert [o.finish_reason for o in out] == ["context", "context"]  # one prefill for the batch
    assert out[0].tokens == []


def test_each_segment_draws_fresh_randomness(tiny):
    _, model = tiny
    s = Sampler(model, None, batch_size=1, cache_size=128, params=SamplingParams(temperature=5.0))
    s.start([[3, 4, 5]], seeds=[7], max_new_tokens=1)
    first_key = s.rows[0].key.copy()
    s.decode()
    s.append(0, [9], max_new_tokens=1)
    assert not np.array_equal(s.rows[0].key, first_key)


# ----------------------------------------------------------------------------- shared prompt prefill

GROUPS = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]] * 3  # 3 distinct prompts of 7, 3 and 5 tokens


def _count_shared_prefills(monkeypatch):
    from igpo_jax.rollout import sampler as sampler_lib

    calls, real = [], sampler_lib._shared_prefill_call
    monkeypatch.setattr(sampler_lib, "_shared_prefill_call", lambda *a: calls.append(a[3].shape) or real(*a))
    return calls


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9)], ids=["greedy", "seeded"])
def test_shared_prompt_prefill_samples_what_one_prefill_per_row_does(tiny, params, monkeypatch):
    _, model = tiny
    seeds = list(range(20, 28))
    run = lambda share: Sampler(model, None, batch_size=8, cache_size=64, params=params, steps_per_call=8,
                                share_prompt_prefill=share).generate(GROUPS, seeds, max_new_tokens=20)
    calls = _count_shared_prefills(monkeypatch)
    shared = run(True)
    assert calls == [(4, 16)]  # one prefill of the 3 distinct prompts (a batch of 4, width 16)
    plain = run(False)
    assert len(calls) == 1  # only with the switch on
    for a, b in zip(shared, plain):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    if not params.greedy:  # rows of a group share the prompt, not the draws
        assert shared[0].tokens != shared[1].tokens


def test_shared_prompt_prefill_on_smollm2_chat_prompts(smollm2, smollm2_tokenizer, monkeypatch):
    tok = smollm2_tokenizer
    calls = _count_shared_prefills(monkeypatch)
    questions = ["What is the capital of France?", "Name three primary colors, please, and say why they are primary."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                       add_generation_prompt=True)["input_ids"] for q in questions]
    assert len(prompts[0]) != len(prompts[1])
    groups = [prompts[0]] * 2 + [prompts[1]] * 2
    for params in (GREEDY, SamplingParams(temperature=1.0)):
        run = lambda share: Sampler(smollm2, tok, batch_size=4, cache_size=128, params=params,
                                    share_prompt_prefill=share).generate(groups, [1, 2, 3, 4], max_new_tokens=12)
        for a, b in zip(run(True), run(False)):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert [shape[0] for shape in calls] == [2, 2]  # 2 distinct prompts for 4 rows, once per run


SYSTEM = [11, 23, 5, 87, 42, 19, 64, 3, 77, 8, 150, 36, 91, 14, 2, 58, 120, 7, 33, 66, 4, 99, 12, 45, 81, 6, 28, 140,
          9, 52, 17, 73, 30, 111, 21, 5]  # 36 tokens every prompt opens with


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9)], ids=["greedy", "seeded"])
def test_a_common_system_prompt_is_prefilled_once_for_distinct_questions(tiny, params, monkeypatch):
    _, model = tiny
    questions = [[5, 17], [7, 7, 12, 40], [100, 2, 33], [9], [60, 61, 62, 63, 64], [3, 3], [70, 71, 72], [8, 1]]
    prompts = [SYSTEM + q for q in questions]  # 8 distinct prompts: nothing to share per group
    run = lambda share: Sampler(model, None, batch_size=8, cache_size=128, params=params, steps_per_call=8,
                                min_span=16, share_prompt_prefill=share).generate(prompts, list(range(8)), 12)
    calls = _count_shared_prefills(monkeypatch)
    shared = run(True)
    assert calls == [(1, 32)]  # the first 32 of the 36 common tokens (a quarter octave), once, for 8 rows
    plain = run(False)
    assert len(calls) == 1
    for a, b in zip(shared, plain):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_a_long_common_prefix_is_cut_at_a_multiple_of_the_append_bucket(tiny, monkeypatch):
    """150 common tokens: cut at 144 (a multiple of 16), not at the quarter octave 128, so each row's
    remainder (≤ 15 tokens) is extended at width 16 rather than 32; the same tokens as the plain
    prefill."""
    from igpo_jax.rollout import sampler as sampler_lib

    _, model = tiny
    system = (SYSTEM * 5)[:150]
    questions = [[5, 17], [7, 7, 12, 40], [100, 2, 33], [9], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [3, 3],
                 [70, 71, 72], [8, 1]]
    prompts = [system + q for q in questions]
    written, widths = [], []
    real_prefill, real_extend = sampler_lib._shared_prefill_call, sampler_lib._extend_call
    monkeypatch.setattr(sampler_lib, "_shared_prefill_call", lambda *a: written.append(a[7]) or real_prefill(*a))
    monkeypatch.setattr(sampler_lib, "_extend_call", lambda *a: widths.append(a[3].shape) or real_extend(*a))
    run = lambda share: Sampler(model, None, batch_size=8, cache_size=512, params=GREEDY, steps_per_call=8,
                                min_span=16, share_prompt_prefill=share).generate(prompts, list(range(8)), 6)
    shared = run(True)
    assert written == [144] and widths == [(8, 16)]
    plain = run(False)
    for a, b in zip(shared, plain):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_an_append_to_the_whole_batch_is_padded_to_a_quarter_octave(tiny, monkeypatch):
    """An append that feeds the whole batch (not a gathered few rows) takes the longest feed's width
    rounded to a quarter octave (41 tokens: 48, not 64), and continues as prefilling the
    concatenation does."""
    from igpo_jax.rollout import sampler as sampler_lib

    _, model = tiny
    widths, real = [], sampler_lib._extend_call
    monkeypatch.setattr(sampler_lib, "_extend_call", lambda *a: widths.append(a[3].shape[1]) or real(*a))
    s = Sampler(model, None, batch_size=2, cache_size=256, params=GREEDY, steps_per_call=8, min_span=16)
    first = s.generate([PROMPTS[0], PROMPTS[1]], [0, 1], 3)
    # 41 and 20 tokens: the pending token of the last turn goes first, the last appended one waits
    appended = [list(range(200, 241)), list(range(300, 320))]
    widths.clear()
    s.append([0, 1], appended, 4)
    rest = {}
    while s.decoding_rows():
        rest.update(s.decode())
    assert widths == [48]  # quarter_octave(41) = 48, not power_of_two(41) = 64
    for r, prompt in enumerate((PROMPTS[0], PROMPTS[1])):
        whole = prompt + first[r].tokens + appended[r]
        alone = Sampler(model, None, batch_size=1, cache_size=256, params=GREEDY).generate([whole], [0], 4)[0]
        assert rest[r].tokens == alone.tokens


def test_the_common_prefix_is_not_shared_where_it_would_cost_more(tiny, monkeypatch):
    _, model = tiny
    calls = _count_shared_prefills(monkeypatch)
    # two groups of 4 with long, different tails: two prompt prefills cost less than one prefix
    # plus 8 rows of tail
    prompts = [SYSTEM[:16] + [1] * 40] * 4 + [SYSTEM[:16] + [2] * 40] * 4
    Sampler(model, None, batch_size=8, cache_size=128, params=GREEDY, min_span=16).generate(prompts, list(range(8)), 4)
    assert [shape[0] for shape in calls] == [2]  # the per-group prefill, not the prefix


# ----------------------------------------------------------------------------- restart and compaction

def test_restart_samples_as_a_fresh_start_and_compaction_keeps_the_math(tiny, monkeypatch):
    """A 2-row sampler runs 5 sequences by restarting freed rows; each equals its own generate()."""
    from igpo_jax.rollout import sampler as sampler_lib

    _, model = tiny
    compactions, real_compact = [], sampler_lib._compact_call
    monkeypatch.setattr(sampler_lib, "_compact_call", lambda c: compactions.append(int(c.length)) or real_compact(c))
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [44]]
    budgets, seeds = [6, 3, 9, 4, 7], [5, 6, 7, 8, 9]
    params = SamplingParams(temperature=1.0)
    alone = [Sampler(model, None, batch_size=1, cache_size=64, params=params, steps_per_call=4)
             .generate([p], [s], n)[0] for p, s, n in zip(prompts, seeds, budgets)]
    # 40 slots: the cursor runs past the end unless compaction drops finished rows' slots
    s = Sampler(model, None, batch_size=2, cache_size=40, params=params, steps_per_call=4, append_bucket=4,
                compact_cache=True)
    s.start(prompts[:2], seeds[:2], budgets[:2])
    row_of, waiting, out = {0: 0, 1: 1}, [2, 3, 4], {}
    while s.decoding_rows():
        for r, o in s.decode().items():
            out[row_of[r]] = o
            if waiting:
                nxt = waiting.pop(0)
                s.restart([r], [prompts[nxt]], [seeds[nxt]], budgets[nxt])
                row_of[r] = nxt
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert compactions  # the cursor reached the end at least once and was pulled back
    for i, ref in enumerate(alone):
        assert out[i].tokens == ref.tokens and out[i].finish_reason == ref.finish_reason
        np.testing.assert_allclose(out[i].logprobs, ref.logprobs, atol=1e-5)
    without = Sampler(model, None, batch_size=2, cache_size=40, params=params, steps_per_call=4, append_bucket=4)
    without.start(prompts[:2], seeds[:2], budgets[:2])
    reasons = []
    while without.decoding_rows():
        for r, o in without.decode().items():
            reasons.append(o.finish_reason)
            if waiting or len(reasons) < 4:
                without.restart([r], [prompts[3]], [seeds[3]], budgets[3])
    assert "context" in reasons  # the same schedule without compaction runs out of cache


def test_release_drops_a_pending_report_and_rejects_a_decoding_row(tiny):
    _, model = tiny
    s = Sampler(model, None, batch_size=2, cache_size=16, params=GREEDY)
    s.start([[1, 2, 3], [4, 5]], [0, 1], 4)
    with pytest.raises(ValueError, match="still decoding"):
        s.release([0])
    s.decode()
    s.append(0, list(range(1, 30)), max_new_tokens=4)  # does not fit: reported by the next decode...
    s.release([0])  # ...unless the row is released first
    assert 0 not in s.decode()


def test_compaction_lets_rows_whose_searches_return_apart_finish_in_a_small_cache(tiny):
    """Each row's append advances the shared cursor for every row: four appends of 16 tokens at
    different times overrun a 64-slot cache that each row's own 28 tokens fit in, unless the holes
    are squeezed out (make_sampler always compacts)."""
    _, model = tiny
    prompts = [[5, 17, 99, 3], [7, 7, 12, 4], [100, 2, 33, 4], [9, 8, 7, 6]]

    def run(compact):
        s = Sampler(model, None, batch_size=4, cache_size=64, params=GREEDY, steps_per_call=4, min_span=16,
                    compact_cache=compact)
        s.start(prompts, [0, 1, 2, 3], 4)
        done = {}
        while len(done) < 4:
            done.update(s.decode())
        finished = {}
        for r in range(4):  # the searches come back one by one
            s.append(r, list(range(20, 36)), 4)
            out = {}
            while r not in out:
                out.update(s.decode())
            finished.update(out)
        return [finished[r].finish_reason for r in range(4)]

    assert run(compact=False).count("context") >= 1
    assert "context" not in run(compact=True)


def test_make_sampler_always_compacts(smollm2, smollm2_tokenizer):
    from igpo_jax.rollout.episodes import RolloutConfig, make_sampler

    unbounded = make_sampler(smollm2, smollm2_tokenizer, RolloutConfig(), 8)
    bounded = make_sampler(smollm2, smollm2_tokenizer, RolloutConfig(max_concurrent_rows=4), 8)
    assert (unbounded.batch_size, bounded.batch_size) == (8, 4)
    assert unbounded.compact_cache and bounded.compact_cache


def test_a_full_row_ends_alone_and_the_others_fill_their_own_context(tiny):
    """Spec §1: an episode is cut at its own context limit. A row of 40 prompt tokens fills a 64-slot
    cache first; the row of 10 must go on until its own 64 slots are used, not end with it."""
    _, model = tiny
    s = Sampler(model, None, batch_size=2, cache_size=64, params=GREEDY, steps_per_call=4, min_span=16,
                append_bucket=4, compact_cache=True)
    out = s.generate([list(range(1, 41)), list(range(1, 11))], seeds=[0, 1], max_new_tokens=200)
    assert [o.finish_reason for o in out] == ["context", "context"]
    # a row's last sampled token stays pending: it ends when prompt + generated − 1 = 64 slots
    assert [len(o.tokens) for o in out] == [64 - 40 + 1, 64 - 10 + 1]


def test_an_append_that_fits_its_row_waits_for_room_instead_of_ending(tiny):
    """A long stopped row sets the shared cursor; a short row's tool result fits its own context
    but not above that cursor: it waits (blocked) until the long row's episode ends, then decodes.
    A result that would pass the row's own limit ends that row alone."""
    _, model = tiny
    s = Sampler(model, None, batch_size=3, cache_size=64, params=GREEDY, steps_per_call=4, min_span=16,
                append_bucket=4, compact_cache=True)
    s.start([list(range(1, 51)), [7, 8, 9], [4, 5, 6]], seeds=[0, 1, 2], max_new_tokens=1)
    assert sorted(s.decode()) == [0, 1, 2]  # one token each, then stopped (budget)
    s.append(1, list(range(20, 40)), max_new_tokens=3)  # 4 + 20 of 64: fits the row, not above slot 50
    s.append(2, list(range(1, 70)), max_new_tokens=3)  # 4 + 69 > 64: can never fit
    assert s.blocked_rows() == [1] and s.decoding_rows() == [1]
    assert s.decode() == {2: s.rows[2].out} and s.rows[2].out.finish_reason == "context"
    s.release([0, 2])  # the long row's episode ends
    out = s.decode()
    while s.decoding_rows():
        out.update(s.decode())
    assert s.blocked_rows() == [] and out[1].finish_reason == "length" and len(out[1].tokens) == 3
    alone = Sampler(model, None, batch_size=1, cache_size=64, params=GREEDY, steps_per_call=4, min_span=16,
                    append_bucket=4)
    alone.start([[7, 8, 9]], [1], 1)
    alone.decode()
    alone.append(0, list(range(20, 40)), max_new_tokens=3)
    ref = alone.decode()
    while alone.decoding_rows():
        ref.update(alone.decode())
    assert out[1].tokens == ref[0].tokens  # waiting changed nothing of what it samples
