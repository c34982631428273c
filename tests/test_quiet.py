import sys
import threading

from edgeq.core.quiet import muted_output


def test_muting_in_threads_never_leaves_the_process_silenced(capsys):
    real = sys.stdout
    inside = threading.Barrier(2)
    leave_first = threading.Event()

    def worker(first: bool):
        with muted_output():
            print("chatter that must not show")
            inside.wait()
            if first:
                leave_first.set()  # leave while the other thread is still muting (redirect_stdout lost stdout here)
            else:
                leave_first.wait()

    threads = [threading.Thread(target=worker, args=(f,)) for f in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sys.stdout is real
    print("still visible")
    out = capsys.readouterr().out
    assert "still visible" in out and "chatter" not in out
