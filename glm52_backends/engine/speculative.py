"""MTP speculative decoding: draft up to k tokens with the nextn layer, verify them in one target step.

State of one request between rounds (n = tokens in its target cache):
  seq[0..n]     committed tokens; seq[n] was emitted but is not yet in the target cache
  target cache  positions 0..n-1 (latent: every layer; index keys: the "full" layers)
  MTP cache     positions 0..n-1; entry i was built from (target hidden h_i, token seq[i+1])
  pending       the MTP layer's output hidden, logits and top-k at position n-1: its logits
                predict seq[n+1]

The engine (engine/scheduler.py: `Engine._draft`, `Engine.step`) runs these rounds for `generate`
and for `glm52 serve`. A round, for all its requests together:
  draft    d_1 from the pending logits; d_2..d_k_i by re-applying the MTP layer at positions
           n..n+k_i-2 to its own output hidden and the previous draft token (one MTP step for all
           requests still drafting). With `index_share_for_mtp_iteration` these steps skip the MTP
           indexer and reuse the pending top-k row (vLLM's step-0 reuse); otherwise each runs the
           indexer.
  verify   one target step over [seq[n], d_1..d_k_i] per request (positions n..n+k_i; the chunks
           may differ in length); the backend's `mtp_verify`, called once per distinct k_i on
           that group's rows, accepts a drafts and emits one more token (the correction, or the
           bonus when a == k_i).
  rollback the target cache back to n+a+1 entries (drops the rejected drafts); the MTP cache back
           to n (its draft-step entries came from MTP hiddens, not target ones).
  catch up (lazily, at the start of the request's next round) one MTP step over positions
           n..n+a from the verified target hiddens and tokens seq[n+1..n+a+1]: the MTP entries
           are then exactly those plain decoding would feed it, and the last row is the new
           pending draft. The prompt's MTP prefill is the first catch-up.

How many drafts a request proposes in a round (k_i <= k):
  * near the end of the context, k_i <= context - 1 - n (the verify step must fit), so generation
    runs up to the context exactly as plain decoding does;
  * adaptive drafting (`draft_threshold=t`, GLM-5.2's "prediction size from contextual
    certainty"): d_1 is always proposed; after proposing d_j the request drafts d_{j+1} only while
    the MTP layer's probability of d_j is above t (`q_j(d_j) > t`). The draft whose probability is
    t or less is still proposed (it costs one verify position, no MTP step) and is the round's
    last. The probability is that of the distribution the draft came from: under sampling the
    temperature / top-p distribution it was drawn from (the one passed to `mtp_verify`), under
    greedy the MTP logits' softmax at temperature 1 (d_j is its argmax, so this is its top
    probability). t = 0 never stops early (same drafts as fixed k); t = 1 always stops after d_1.
    The MTP step that would produce a dropped draft is not run.

Greedy output is the plain greedy output token for token, whatever each k_i. Sampling preserves the
target distribution (Leviathan et al. 2023) because every draft token is drawn from the
distribution passed to `mtp_verify` as `draft_probs`, and whether to draft one more token depends
only on the drafts so far (never on the verify step's uniforms): given an accepted prefix, the next
emitted token is either a verified draft or the bonus token, each distributed as the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

# draft_filter(request, position, proposed_token) -> token: replaces the MTP layer's token choice
# (the MTP layer still runs), e.g. the benchmark's synthetic draft source with a set acceptance
# rate. Under sampling a filtered token is verified as a deterministic draft (draft_probs one-hot:
# accept with probability p(d), else resample from p without d), which keeps the target
# distribution whatever token the filter returns, as long as it does not look at future randomness.
DraftFilter = Callable[[int, int, int], int]

# adaptive drafting's default: propose the next draft only while the MTP layer gives the last one
# more than this probability (`generate(..., adaptive=True, draft_threshold=...)`)
DEFAULT_DRAFT_THRESHOLD = 0.5


def acceptance_stats(requests: Iterable) -> dict[str, float]:
    """Per request and verify round (`Request.accepted` / `.drafted`): `mean_acceptance_length` (tokens
    emitted, the bonus counted; 1.0 = no draft ever accepted), `mean_drafted_tokens` (drafts proposed),
    `mean_accepted_drafts`, and `draft_acceptance_rate` (accepted drafts / proposed drafts). NaN when no
    verify round ran."""
    requests = list(requests)
    acc = [a for r in requests for a in r.accepted]
    drafted = [k for r in requests for k in r.drafted]
    nan = math.nan
    return {"mean_acceptance_length": (sum(acc) + len(acc)) / len(acc) if acc else nan,
            "mean_accepted_drafts": sum(acc) / len(acc) if acc else nan,
            "mean_drafted_tokens": sum(drafted) / len(drafted) if drafted else nan,
            "draft_acceptance_rate": sum(acc) / sum(drafted) if sum(drafted) else nan}


__all__ = ["DraftFilter", "DEFAULT_DRAFT_THRESHOLD", "acceptance_stats"]
