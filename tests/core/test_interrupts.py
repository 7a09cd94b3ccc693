"""A Ctrl-C that lands in a finaliser is raised again, not swallowed with a traceback."""

import subprocess
import sys
import textwrap

import pytest

# a finaliser that receives SIGINT while it runs, as GitPython's Repo.__del__ did in a worker
PROGRAM = textwrap.dedent("""
    import os, signal, sys, time
    from skinml.core.interrupts import keep_interrupts
    if sys.argv[1] == "kept":
        keep_interrupts()

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass

    try:
        Finalised()
        time.sleep(2)
        print("went on")
    except KeyboardInterrupt:
        print("interrupted")
""")


@pytest.mark.parametrize("mode, expected", [("plain", "went on"), ("kept", "interrupted")])
def test_a_ctrl_c_inside_a_finaliser(mode, expected):
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == expected
    assert ("Traceback" in done.stderr) == (mode == "plain"), done.stderr
