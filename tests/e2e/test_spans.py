"""Span scoring: prompt/response and chat records, only the response / assistant tokens counted."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tailjax import data
from tailjax import eval as evaluation
from tailjax.eval import EvalConfig
from tailjax.data import spans

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six, of course."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Say nothing."}]},  # nothing to score: dropped
]
PAIRS = [{"prompt": "Question: what does len() return?\nAnswer:", "response": " the number of items."},
         {"prompt": "Translate 'chat' to English:", "completion": " cat"}]


def write_jsonl(path, records):
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return str(path)


def test_chat_records_score_only_assistant_tokens(smollm2, tmp_path):
  """SmolLM2's own chat template: each scored target is an assistant message's content, its <|im_end|> and the
  newline the template writes after it, and nothing else (ids compared, specials included)."""
  tok = smollm2.tokenizer
  corpus = write_jsonl(tmp_path / "chats.jsonl", CHATS)
  assert spans.span_kind(corpus) == "chat"
  windows = data.corpus_windows(corpus, tok, data.Protocol("chat", seq_len=512, num_sequences=None))
  assert len(windows) == 2 and windows.starts.tolist() == [0, 1]
  end, newline = tok.backend.token_to_id("<|im_end|>"), tok.encode("\n")
  for row, chat in enumerate(CHATS[:2]):
    expected = [i for m in chat["messages"] if m["role"] == "assistant" for i in [*tok.encode(m["content"]), end,
                                                                                   *newline]]
    assert windows.tokens[row, 1:][windows.scored[row]].tolist() == expected
  assert windows.scored_tokens == 14 + 4
  assert windows.tokens.shape[1] == max(np.flatnonzero(windows.tokens[r]).max() + 1 for r in range(2))  # no padding
  # the whole pipeline: the report counts those tokens, the dump holds them alone
  result = evaluation.run(EvalConfig(evaluation.default_reference(), ["@int4-g64"], corpus,
                                     protocol=data.Protocol("chat", seq_len=512, num_sequences=None),
                                     dump_tokens=tmp_path / "tokens.parquet"), tmp_path / "run")
  assert result["run"]["scored_tokens"] == 18 and result["run"]["seq_len"] == windows.tokens.shape[1]
  dump = pq.read_table(tmp_path / "tokens.parquet").to_pydict()
  assert len(dump["kld"]) == 18 and dump["target"] == windows.tokens[:, 1:][windows.scored].tolist()
  assert result["candidates"]["int4-g64-sym"]["kld"]["median"] > 0


def test_prompt_response_records_score_the_response(smollm2, tmp_path):
  tok = smollm2.tokenizer
  corpus = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
  assert spans.span_kind(corpus) == "prompt-response"
  windows = data.corpus_windows(corpus, tok, data.Protocol("pairs", seq_len=64, num_sequences=None))
  for row, pair in enumerate(PAIRS):
    response = pair.get("response", pair.get("completion"))
    assert tok.decode(windows.tokens[row, 1:][windows.scored[row]].tolist()) == response
    assert windows.scored[row].sum() == len(tok.encode(response))
  cut = data.corpus_windows(corpus, tok, data.Protocol("pairs", seq_len=14, num_sequences=None))
  assert cut.tokens.shape[1] == 14 and cut.truncated == 1  # the first record's response is cut short
  one = data.corpus_windows(corpus, tok, data.Protocol("pairs", seq_len=64, num_sequences=1, seed=0))
  assert len(one) == 1


def test_span_corpora_name_what_is_wrong(smollm2, tmp_path):
  tok = smollm2.tokenizer
  protocol = data.Protocol("pairs", seq_len=64, num_sequences=None)
  bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "no answer here"}])
  with pytest.raises(ValueError, match=r"bad.jsonl:2: a record needs a 'prompt' and a 'response'"):
    data.corpus_windows(bad, tok, protocol)
  chats = write_jsonl(tmp_path / "c.jsonl", CHATS)
  with pytest.raises(ValueError, match="scored record by record; protocol 'strided' with a stride"):
    data.corpus_windows(chats, tok, data.Protocol("strided", seq_len=64, num_sequences=None, stride=32))
  with pytest.raises(ValueError, match="chat records need the reference tokenizer's chat template"):
    data.corpus_windows(chats, dataclasses.replace(tok, chat_template=None), protocol)
  with pytest.raises(ValueError, match="2 records with tokens to score, fewer than the 5"):
    data.corpus_windows(chats, tok, data.Protocol("chat", seq_len=512, num_sequences=5))
  last_only = "{% for m in messages %}{% if loop.last %}{{ m.content }}{% endif %}{% endfor %}"
  with pytest.raises(ValueError, match="x:1: the chat template renders message 1 differently"):
    spans.render_chat(CHATS[0]["messages"], last_only, {}, "x:1")


def test_a_response_token_that_starts_on_the_prompts_space_is_scored_and_drops_are_named(smollm2, tmp_path):
  """" Oslo" is one token that starts on the prompt's trailing space: it predicts the response, so it is scored
  (eval and SFT alike); records with nothing to score are left out, counted and named by file:line."""
  tok = smollm2.tokenizer
  records = [{"prompt": "The capital of Norway is ", "response": "Oslo"},
             {"prompt": "Empty answer:", "response": ""},
             {"prompt": "Q: 2+2?\nA:", "response": " 4"}]
  corpus = write_jsonl(tmp_path / "pairs.jsonl", records)
  windows = data.corpus_windows(corpus, tok, data.Protocol("pairs", seq_len=64, num_sequences=None))
  assert windows.dropped == (f"{corpus}:2",) and windows.starts.tolist() == [0, 2]
  first = windows.tokens[0, 1:][windows.scored[0]].tolist()
  assert first == tok.encode(" Oslo") and len(first) == 1  # the token straddling the prompt's last character
  assert tok.decode(windows.tokens[1, 1:][windows.scored[1]].tolist()) == " 4"
  packed = spans.pack_records(spans.read_records(write_jsonl(tmp_path / "sft.jsonl", records[:1]), tok), tok, 32,
                              "sft.jsonl")
  assert packed.tokens[0][packed.scored[0]].tolist() == first
  chats = write_jsonl(tmp_path / "chats.jsonl", CHATS + [{"messages": []}])
  result = evaluation.run(EvalConfig(evaluation.default_reference(), ["@int4-g64"], chats,
                                     protocol=data.Protocol("chat", seq_len=512, num_sequences=None)), tmp_path / "run")
  assert result["run"]["dropped_records"] == [f"{chats}:3", f"{chats}:4"]
  page = (tmp_path / "run" / "report.md").read_text()
  assert "2 records with nothing to score left out" in page
  assert "[GGUF, Q4_1: quantized weights (dequantized on load), not a float reference]" in page


def test_a_record_corpus_scores_every_record_unless_a_number_is_asked_for(smollm2, tmp_path):
  from tailjax.eval.config import EvalConfig

  corpus = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
  for protocol in (None, "ram", "default"):  # 128 and 12 windows for plain text; two records here
    chosen = EvalConfig(reference="x", corpus=corpus, protocol=protocol).window_protocol()
    assert chosen.num_sequences is None and len(data.corpus_windows(corpus, smollm2.tokenizer, chosen)) == 2
  assert EvalConfig(corpus="pydoc").window_protocol().num_sequences == 12
  asked = EvalConfig(reference="x", corpus=corpus, num_sequences=5).window_protocol()
  with pytest.raises(ValueError, match="2 records with tokens to score, fewer than the 5 windows protocol 'ram' "
                                       "samples; give num_sequences 0 to score every record"):
    data.corpus_windows(corpus, smollm2.tokenizer, asked)
