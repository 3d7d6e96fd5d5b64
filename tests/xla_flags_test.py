"""The programs' XLA flags: appended once, the user's own setting wins."""

from igpo_jax.runtime.xla_flags import add_cpu_memory_flags


def test_flags_are_appended_once_and_user_settings_win():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    add_cpu_memory_flags(env)
    add_cpu_memory_flags(env)
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    mine = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    add_cpu_memory_flags(mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    empty = {}
    add_cpu_memory_flags(empty)
    assert empty["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"
