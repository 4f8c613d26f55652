import json

import pytest
from click.testing import CliRunner

from tailjax.cli import main

PAPER_CSV = """name,mean,median,p90,p99
teacher,1.442,0.609,3.9,5.57
full-kl,1.489,0.632,4.0,5.73
top40,1.520,0.620,4.1,5.88
top15,1.568,0.596,4.3,6.37
top5,1.708,0.525,4.6,7.82
"""
JUDGE_CSV = "name,score\nteacher,2.01\nfull-kl,1.92\ntop40,1.97\ntop15,2.00\ntop5,2.06\n"


@pytest.fixture
def family(tmp_path):
  (tmp_path / "family.csv").write_text(PAPER_CSV)
  (tmp_path / "judge.csv").write_text(JUDGE_CSV)
  return tmp_path


def test_select_writes_the_contract(family):
  out = family / "out"
  result = CliRunner().invoke(main, ["select", str(family / "family.csv"), "--task-scores",
                                     str(family / "judge.csv"), "--output", str(out)])
  assert result.exit_code == 0, result.output
  assert "mean selects teacher but median selects top5" in result.output
  assert "reshaping" in result.output
  sel = json.loads((out / "selection.json").read_text())
  assert sel["selected"] == "top5"
  assert sel["selected_by"]["mean"] == "teacher" and sel["selected_by"]["median"] == "top5"
  assert sel["concordance"]["mean,median"] == pytest.approx(0.2)
  assert "mean,median,p90,p99" in sel["concordance"]
  assert sel["correlations"]["median"]["spearman"] < 0 < sel["correlations"]["mean"]["spearman"]


def test_select_by_mean_and_json_tables(family):
  rows = {"a": {"mean": 1.0, "median": 0.5}, "b": {"mean": 2.0, "median": 0.9}}
  (family / "t.json").write_text(json.dumps(rows))
  out = family / "o"
  result = CliRunner().invoke(main, ["select", str(family / "t.json"), "--by", "mean", "--summaries", "mean,median",
                                     "--output", str(out)])
  assert result.exit_code == 0, result.output
  sel = json.loads((out / "selection.json").read_text())
  assert sel["selected"] == "a" and sel["regime"] == "uniform improvement" and sel["warning"] is None


def test_default_summaries_follow_the_table(family):
  """A table without p90: the default summaries are those it has, and the report says which it lacks; asked for
  by name, a missing summary is still an error."""
  (family / "no-p90.csv").write_text("name,mean,median,p99\na,1.0,0.5,3.0\nb,2.0,0.9,4.0\nc,1.5,0.7,3.5\n")
  result = CliRunner().invoke(main, ["select", str(family / "no-p90.csv"), "--output", str(family / "o")])
  assert result.exit_code == 0, result.output
  assert "summaries p90 are not in every row of the table: left out" in result.output
  sel = json.loads((family / "o" / "selection.json").read_text())
  assert sel["summaries"] == ["mean", "median", "p99"] and sel["missing_summaries"] == ["p90"]
  asked = CliRunner().invoke(main, ["select", str(family / "no-p90.csv"), "--summaries", "mean,p90"])
  assert asked.exit_code != 0 and "summaries ['p90'] are missing" in asked.output


@pytest.mark.parametrize("content, message", [
    ("name,mean,median\nonly,1.0,0.5\n", "at least two checkpoints"),
    ("name,mean\na,1.0\nb,2.0\n", "summaries ['median'] are missing"),  # the one it selects by
    ("mean,median\n1.0,0.5\n", "needs a 'name' column"),
    ("name,mean,median,p90,p99\na,1,1,1,x\nb,1,1,1,1\n", "'x' is not a number"),
])
def test_select_bad_tables(family, content, message):
  (family / "bad.csv").write_text(content)
  result = CliRunner().invoke(main, ["select", str(family / "bad.csv")])
  assert result.exit_code != 0 and message in result.output


def test_select_bad_scores(family):
  (family / "scores.csv").write_text("name,score\nteacher,2.0\ntop5,nan\nfull-kl,1\ntop40,1\ntop15,1\n")
  result = CliRunner().invoke(main, ["select", str(family / "family.csv"), "--task-scores",
                                     str(family / "scores.csv")])
  assert result.exit_code != 0 and "NaN task scores" in result.output
  result = CliRunner().invoke(main, ["select", str(family / "missing.csv")])
  assert result.exit_code != 0 and "no such summary table" in result.output


@pytest.mark.parametrize("content, message", [
    ('{"a": {"mean": "high"}, "b": {"mean": 1}}', "checkpoint 'a' summary 'mean': 'high' is not a number"),
    ('{"a": {"mean": null}, "b": {"mean": 1}}', "checkpoint 'a' summary 'mean': None is not a number"),
    ('{"a": ', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_select_bad_json_tables(family, content, message):
  (family / "bad.json").write_text(content)
  result = CliRunner().invoke(main, ["select", str(family / "bad.json")])
  assert result.exit_code != 0 and message in result.output and "bad.json" in result.output


def test_families_and_the_markdown_and_html_reports(family):
  out = family / "out"
  result = CliRunner().invoke(main, ["select", str(family / "family.csv"), "--family", "distilled=[ft][uo]*",
                                     "--family", "top=top*", "--output", str(out)])
  assert result.exit_code == 0, result.output
  sel = json.loads((out / "selection.json").read_text())
  distilled = sel["families"]["distilled"]
  assert distilled["checkpoints"] == ["full-kl", "top40", "top15", "top5"]
  # hand count over the 6 pairs of {full-kl, top40, top15, top5}: mean orders them full-kl < top40 < top15 < top5,
  # median exactly the other way round (0.632 > 0.620 > 0.596 > 0.525): every pair is discordant
  assert distilled["concordance"]["mean,median"] == 0.0
  assert distilled["selected"] == "top5" and distilled["regime"] == "reshaping"
  assert sel["families"]["top"]["checkpoints"] == ["top40", "top15", "top5"]
  markdown = (out / "selection.md").read_text()
  assert "| top5 | 1.708 | 0.5250 | 4.600 | 7.820 | median |" in markdown and "## Pairwise concordance" in markdown
  assert "family distilled (4 checkpoints)" in markdown
  assert (out / "selection.html").read_text().count("data:image/png;base64") == 2  # no percentiles: no profiles
  lonely = CliRunner().invoke(main, ["select", str(family / "family.csv"), "--family", "t=teacher"])
  assert lonely.exit_code != 0 and "a family needs at least two checkpoints: t=teacher matches ['teacher']" in \
      lonely.output


def test_pages_colour_each_model_once_and_shade_runs_by_step():
  from matplotlib.colors import to_rgb

  from tailjax.report import pages

  colors = pages.colors(["ref", "int4", "int3", "int4"])
  assert list(colors) == ["ref", "int4", "int3"] and len(set(colors.values())) == 3
  assert pages.colors(["ref", "int4", "int3"]) == colors  # the same model, the same colour, in every plot
  shades = pages.run_shades({"lr1": [(200, "lr1@200"), (100, "lr1@100"), (300, "lr1@300")], "lr2": [(100, "lr2@100")]})
  lightness = [sum(to_rgb(shades[f"lr1@{step}"])) for step in (100, 200, 300)]
  assert lightness[0] > lightness[1] > lightness[2]  # later steps darker
  assert shades["lr1@300"] == pages.colors(["lr1", "lr2"])["lr1"] != shades["lr2@100"]  # last step: the run's hue
