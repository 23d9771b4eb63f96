"""The device boundary's process joining, and the entry point's mode flags."""

import pytest

from clevr_jax import sharding
from clevr_jax import validate


def test_coordinator_without_process_count_or_id_is_refused_before_joining():
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    sharding.join_processes("localhost:12345", num_processes=2)


def test_one_process_joins_nothing_and_counts_its_devices():
  import jax  # pylint: disable=g-import-not-at-top
  assert sharding.join_processes() == (1, jax.local_device_count())


@pytest.mark.parametrize("mode, missing", [("report", "--workdirs"), ("segment", "--images")])
def test_a_mode_without_its_flag_names_the_flag(mode, missing):
  with pytest.raises(ValueError, match=missing):
    validate.check_mode_flags(mode, [], [])
  validate.check_mode_flags(mode, ["a"], ["b"])  # given, nothing to say
