"""buckets: the shapes that sampling and scoring pad to."""

from igpo_jax.rollout.buckets import power_of_two, quarter_octave, quarter_octave_floor


def test_power_of_two_rounds_up_and_respects_the_minimum():
    assert [power_of_two(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 1000)] == [1, 1, 2, 4, 4, 8, 8, 16, 1024]
    assert power_of_two(3, minimum=16) == 16 and power_of_two(17, minimum=16) == 32


def test_quarter_octave_pads_by_at_most_a_quarter():
    # between 64 and 128 the step is 16; between 128 and 256 it is 32
    assert [quarter_octave(n, 32) for n in (1, 32, 33, 64, 65, 80, 81, 128, 129, 200)] == \
        [32, 32, 40, 64, 80, 80, 96, 128, 160, 224]
    assert all(quarter_octave(n, 1) - n <= n // 4 for n in range(1, 5000))
    assert quarter_octave(100, 1, steps_per_octave=1) == 128


def test_quarter_octave_floor_is_the_largest_quarter_octave_size_not_above_n():
    assert [quarter_octave_floor(n) for n in (1, 7, 36, 250, 256, 266)] == [1, 7, 32, 224, 256, 256]
    for n in range(1, 600):
        f = quarter_octave_floor(n)
        assert f <= n and quarter_octave(f, 1) == f  # a size quarter_octave itself produces
