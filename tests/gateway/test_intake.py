"""app/gateway/intake.py: the multipart parser's reading of each part's field name."""

from __future__ import annotations

from app.gateway.intake import parse_multipart_files

_TYPE = "multipart/form-data; boundary=b0undary"


def _body(*dispositions: str) -> bytes:
    parts = [
        f"--b0undary\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n"
        f"data{index}\r\n"
        for index, disposition in enumerate(dispositions)
    ]
    return ("".join(parts) + "--b0undary--\r\n").encode()


def test_a_quoted_name_without_escapes_is_read_as_is() -> None:
    """Parts named "files" in plain quotes are the files, in order, with their content type."""
    body = _body(
        'form-data; name="files"; filename="0.png"', 'form-data; name="files"; filename="1.png"'
    )
    uploads = parse_multipart_files(_TYPE, body, "files", max_files=8)
    assert [(u.data, u.content_type) for u in uploads] == [
        (b"data0", "image/png"),
        (b"data1", "image/png"),
    ]


def test_an_escaped_quoted_name_is_unescaped() -> None:
    """A backslash escape in a quoted name is undone: "fi\\les" names the field `files`."""
    body = _body('form-data; name="fi\\les"; filename="0.png"', 'form-data; name="other"')
    uploads = parse_multipart_files(_TYPE, body, "files", max_files=8)
    assert [u.data for u in uploads] == [b"data0"]
