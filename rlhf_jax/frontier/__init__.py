"""The reward-vs-KL frontier (DPO paper, Rafailov et al. 2023, Fig. 2 left): its results (CSV,
table, figure: `frontier.results`) and the experiment that produces them
(`frontier.pipeline.run_frontier`, the `make demo` job). Its sweeps are `rlhf_jax.sweeps`; its
Preferred-FT / Unlikelihood steps `rlhf_jax.train.unlikelihood`.
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

__all__ = [
    "BAND_COLUMNS",
    "COLUMNS",
    "METHODS",
    "format_table",
    "frontier_bands",
    "frontier_table",
    "frontier_table_ci",
    "make_row",
    "plot_frontier",
    "read_csv",
    "separations",
    "write_bands_csv",
    "write_csv",
]
