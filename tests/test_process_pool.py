"""data.process_pool: ordered results for any worker count, and a script without a main guard still works."""

import pathlib
import subprocess
import sys
import textwrap

from histokd_jax.data import process_pool

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_results_keep_the_jobs_order_with_two_workers():
    jobs = list(range(20, 0, -1))
    assert list(process_pool.map_in_order(abs, [-j for j in jobs], workers=2)) == jobs


def test_a_script_without_a_main_guard_falls_back_to_one_process(tmp_path):
    # spawned workers re-run such a script from the top, so they cannot start their own pool
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from histokd_jax.data import process_pool
        print("RESULT", list(process_pool.map_in_order(abs, [-3, -1, -2], workers=2)))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RESULT [3, 1, 2]" in done.stdout.splitlines()
    assert 'needs `if __name__ == "__main__":`' in done.stderr
