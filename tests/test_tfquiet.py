"""TensorFlow's import-time C++ notices follow TF_CPP_MIN_LOG_LEVEL (unet_dist.tfquiet)."""

import os
import subprocess
import sys

from conftest import ROOT, subprocess_env

from unet_dist.tfquiet import filter_lines, filtered_stderr

BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
IMPORT_TEXT = (
    BANNER
    + "I0000 00:00:1796304126.382964   13786 port.cc:153] oneDNN custom operations are on.\n"
    + "I0000 00:00:1796304126.438582   13786 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
    + "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow\n"
    + "/x/site-packages/foo.py:3: DeprecationWarning: printed by Python during the import\n"
    + "W0000 00:00:1796304129.709587   13786 some.cc:1] a warning\n"
    + "E0000 00:00:1796304129.709587   13786 some.cc:2] an error\n"
)


def test_import_notices_below_the_level_are_dropped_and_the_rest_kept_in_order():
    assert filter_lines(IMPORT_TEXT, 0) == IMPORT_TEXT
    lines = IMPORT_TEXT.splitlines(keepends=True)
    assert filter_lines(IMPORT_TEXT, 1) == "".join(lines[4:])  # banner, INFO notices and their second line
    assert filter_lines(IMPORT_TEXT, 2) == lines[4] + lines[6]
    assert filter_lines(IMPORT_TEXT, 3) == lines[4]


def test_filtered_stderr_holds_file_descriptor_2_and_writes_back_what_is_kept(capfd):
    with filtered_stderr(1):
        os.write(2, IMPORT_TEXT.encode())
        os.write(2, b"and more\n")
    err = capfd.readouterr().err
    assert err == "".join(IMPORT_TEXT.splitlines(keepends=True)[4:]) + "and more\n"


def test_importing_tensorflow_through_unet_dist_prints_no_notices_below_the_level():
    code = "import unet_dist, tensorflow; print('imported')"
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env=subprocess_env(TF_CPP_MIN_LOG_LEVEL="1"))
    assert quiet.returncode == 0 and quiet.stdout == "imported\n" and quiet.stderr == "", quiet.stderr
    # At level 0 everything shows: TensorFlow does print these, so the filter is what removed them.
    loud = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(TF_CPP_MIN_LOG_LEVEL="0"))
    assert loud.returncode == 0 and "oneDNN custom operations are on" in loud.stderr and BANNER in loud.stderr
