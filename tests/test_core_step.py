"""Step strings: 500it, 2ep, 2ep100it."""
import pytest

from wsjax.core.step import Step, StepError, parse_step


@pytest.mark.parametrize("text,want", [("500it", 500), ("2ep", 78), ("2ep100it", 178),
                                       ("0ep", 0), ("17", 17), (42, 42), (" 1ep 3it ", 42)])
def test_parse(text, want):
  assert parse_step(text, 39) == want


@pytest.mark.parametrize("text", ["12xx", "ep", "it", "", "-3it", "1.5ep", "2ep2ep"])
def test_malformed(text):
  with pytest.raises(StepError, match="malformed step"):
    Step.parse(text, 39)


def test_epochs_and_string_round_trip():
  s = Step.parse("3ep5it", 10)
  assert (s.iteration, s.ep, s.it) == (35, 3, 5)
  assert str(s) == "3ep5it" and str(Step(30, 10)) == "3ep" and str(Step(0, 10)) == "0it"
  assert Step.parse(str(s), 10) == s and Step(5, 10) < Step(6, 99)
  with pytest.raises(StepError):
    Step(-1, 10)
