"""Result files: written atomically, except to a stream path, which is written to and never replaced."""

from __future__ import annotations

from deadrelu.core.files import atomic_write_text


def test_a_stream_path_is_written_to_not_replaced(tmp_path):
    import os
    import stat

    from deadrelu.core.files import is_stream_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert is_stream_path(fifo) and is_stream_path("/dev/stdout") and not is_stream_path(tmp_path / "r.json")
    out = tmp_path / "out.txt"
    out.write_text("table\n")
    # /dev/stdout redirected to a file is that file through /proc: appended to, never renamed over
    with open(out, "a") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            atomic_write_text("/dev/stdout", "{}\n")
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    assert out.read_text() == "table\n{}\n"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
