"""The ranks of a data-parallel run check the same --out folder at the same moment: each check uses a probe
file of its own, so one rank's clean-up never makes another rank's check fail ("cannot write there (No such
file or directory)", exit 2, and that rank's trace lost)."""
import threading

from ris_stability.records.folders import writable_folder


def test_concurrent_checks_of_one_folder_all_pass(tmp_path):
    errors, start = [], threading.Barrier(8)

    def check() -> None:
        start.wait()
        for _ in range(300):
            try:
                writable_folder(tmp_path / "run", "--out", "choose another")
            except Exception as err:  # the UsageError a clashing probe caused
                errors.append(str(err))
                return

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind
