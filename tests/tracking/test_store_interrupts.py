"""A Ctrl-C that lands inside a tracking-store write waits for the write to finish: raised
mid-transaction it loses the write and can leave SQLite locked, so the interrupted command
could not mark its run KILLED."""

import subprocess
import sys
import textwrap

import pytest

# SIGINT the moment the metric's row is written, inside SQLAlchemy's transaction
PROGRAM = textwrap.dedent("""
    import signal, sqlite3, sys, time
    import mlflow
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from skinml.core.interrupts import keep_interrupts
    import skinml.tracking.store  # noqa: F401  (its pool hooks)

    path, mode = sys.argv[1:]
    if mode == "kept":
        keep_interrupts()
    mlflow.set_tracking_uri(f"sqlite:///{path}")
    run = mlflow.start_run()

    def ctrl_c(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO metrics"):
            signal.raise_signal(signal.SIGINT)

    event.listen(Engine, "after_cursor_execute", ctrl_c)
    try:
        mlflow.log_metric("loss", 1.0)
        time.sleep(5)
        print("went on")
    except KeyboardInterrupt:
        print("interrupted")
    event.remove(Engine, "after_cursor_execute", ctrl_c)
    print(len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")))
    probe = sqlite3.connect(path, timeout=0.5)
    try:
        probe.execute("BEGIN IMMEDIATE")
        print("free")
        probe.rollback()
    except sqlite3.OperationalError:
        print("locked")
    probe.close()  # else the run's end at exit waits 20 s for the probe's lock
    mlflow.end_run()
""")


@pytest.mark.parametrize("mode, kept", [("plain", "0"), ("kept", "1")])
def test_a_ctrl_c_inside_a_store_write(mode, kept, tmp_path, tracking):  # a made store
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "mlflow.db"), mode],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["interrupted", kept, "free"], done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
