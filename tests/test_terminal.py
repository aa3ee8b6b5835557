"""The terminal tables of `backroom stats` (rich), read cell by cell."""

from __future__ import annotations

from rich.table import Table

import backroom
from backroom.reporting import stats_summary
from backroom.terminal import stats_table


def column(table: Table, header: str) -> dict[str, str]:
    """job name -> the cell of `header` in its row."""
    columns = {str(c.header): [str(cell) for cell in c.cells] for c in table.columns}
    return dict(zip(columns["job"], columns[header], strict=True))


def test_the_stats_table_shows_lease_recoveries_per_job_name_next_to_retries() -> None:
    app = backroom.App("memory://", source="api")

    @app.job()
    def resize(ctx: backroom.Context, frames: int) -> None: ...

    @app.job()
    def publish(ctx: backroom.Context) -> None: ...

    for frames in (1, 2):
        app.enqueue("resize", {"frames": frames})
    lost = app.broker.claim(["default"], worker_id="gone", lease_s=5, limit=2)
    app.broker.sweep_expired(now=max(c.lease_until for c in lost) + 1)  # its worker vanished
    table = stats_table(stats_summary(app))
    assert column(table, "recovered") == {"publish": "0", "resize": "2"}
    assert column(table, "retries") == {"publish": "0", "resize": "0"}
    app.close()
