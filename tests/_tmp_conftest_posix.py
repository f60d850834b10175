# TEMPORARY (to be deleted): stands in for tests/conftest.py's `mnt` fixture
import os, pathlib, tempfile
import pytest

@pytest.fixture
def mnt():
    base = os.environ.get("JFSCACHE_TEST_DIR")
    assert base, "set JFSCACHE_TEST_DIR"
    d = tempfile.mkdtemp(dir=base)
    os.chmod(d, 0o777)
    return pathlib.Path(d)
