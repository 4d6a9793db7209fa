"""The reward-vs-KL frontier (DPO paper, Rafailov et al. 2023, Fig. 2 left): its results (CSV,
table, figure: `frontier.results`) and the experiment that produces them
(`frontier.pipeline.run_frontier`, the `make demo` job). The sweep helpers (`rlhf_jax.sweeps`)
and the Preferred-FT / Unlikelihood steps (`rlhf_jax.train.unlikelihood`) are re-exported here.
"""

from rlhf_jax.frontier.results import (
    BAND_COLUMNS,
    COLUMNS,
    METHODS,
    format_table,
    frontier_bands,
    frontier_table,
    frontier_table_ci,
    make_row,
    plot_frontier,
    read_csv,
    separations,
    write_bands_csv,
    write_csv,
)
from rlhf_jax.sweeps import (
    flatten_sweep_metrics,
    stack_sweep,
    sweep_member,
    sweep_step,
    time_sweep,
)
from rlhf_jax.train.unlikelihood import make_unlikelihood_loss, make_unlikelihood_step

__all__ = [
    "BAND_COLUMNS",
    "COLUMNS",
    "METHODS",
    "flatten_sweep_metrics",
    "format_table",
    "frontier_bands",
    "frontier_table",
    "frontier_table_ci",
    "make_row",
    "make_unlikelihood_loss",
    "make_unlikelihood_step",
    "plot_frontier",
    "read_csv",
    "separations",
    "stack_sweep",
    "sweep_member",
    "sweep_step",
    "time_sweep",
    "write_bands_csv",
    "write_csv",
]
