"""PyTorch transliteration of the reference Bi-tuning / MoCo / Co-Tuning loss semantics.

Written for this project's parity tests and the baseline in `bench/loss_head.py`; the
library never imports it. It follows the reference's structure on purpose, not ours:

  * queues in the reference layout `[D, C*K]` (slot k of class c in column c*K + k);
  * per-sample Python loops that build each query's candidates as
    [own, K positives of its class, (C-1)*K negatives], as the reference does;
  * the CCE scores EVERY class weight against EVERY queue slot (`[C*K, F+1] @ [F+1, C]`)
    and then picks, as the reference does (this is the cost our version avoids);
  * target uniform over the first K+1 candidates, `KLDivLoss(reduction='batchmean')`;
  * enqueue one key at a time in batch order.
"""

import torch
import torch.nn.functional as F


def _kl_batchmean(logits, num_pos):
  """Reference loss: KL(target || softmax(logits)), target uniform on the first num_pos."""
  log_probs = torch.log_softmax(logits, dim=1)
  target = torch.zeros_like(logits)
  target[:, :num_pos] = 1.0 / num_pos
  return torch.nn.KLDivLoss(reduction="batchmean")(log_probs, target)


def ccl_reference(q_z, k_z, queue_z, labels, num_classes, size, temperature=0.07):
  """CCL. q_z, k_z [B, D]; queue_z [D, C*K]; labels [B] (long)."""
  queue = queue_z.clone().detach()
  logits_cur = torch.einsum("nd,nd->n", q_z, k_z).unsqueeze(-1)  # [B, 1]
  rows_pos, rows_neg = [], []
  for i in range(q_z.shape[0]):
    c = int(labels[i])
    per_class = queue.view(queue.shape[0], num_classes, size)  # [D, C, K]
    pos = per_class[:, c, :]  # [D, K]
    neg = torch.cat([per_class[:, :c, :], per_class[:, c + 1:, :]], dim=1).flatten(1)
    rows_pos.append(q_z[i:i + 1] @ pos)
    rows_neg.append(q_z[i:i + 1] @ neg)
  logits = torch.cat([logits_cur, torch.cat(rows_pos), torch.cat(rows_neg)], dim=1)
  return _kl_batchmean(logits / temperature, size + 1)


def cce_reference(q_h_raw, weight, bias, queue_h, labels, num_classes, size,
                  temperature=0.07, detach_head=True):
  """CCE. q_h_raw [B, F]; weight [C, F] (torch layout); bias [C]; queue_h [F+1, C*K]."""
  batch = q_h_raw.shape[0]
  q_h = F.normalize(torch.cat([q_h_raw, torch.ones(batch, 1, dtype=q_h_raw.dtype)], 1),
                    dim=1)
  if detach_head:
    weight, bias = weight.detach(), bias.detach()
  w = F.normalize(torch.cat([weight, bias.unsqueeze(-1)], dim=1), dim=1)  # [C, F+1]
  logits_cur = q_h @ w.T  # [B, C]
  queue = queue_h.clone().detach().T  # [C*K, F+1]
  logits_queue = (queue @ w.T).reshape(num_classes, size, num_classes)  # [C, K, C]
  rows = []
  for i in range(batch):
    c = int(labels[i])
    cur = logits_cur[i:i + 1, c:c + 1]  # [1, 1]
    pos = logits_queue[c, :, c].unsqueeze(0)  # [1, K]
    neg = torch.cat([logits_queue[:c, :, c], logits_queue[c + 1:, :, c]], 0).reshape(1, -1)
    rows.append(torch.cat([cur, pos, neg], dim=1))
  logits = torch.cat(rows) / temperature
  return _kl_batchmean(logits, size + 1)


def enqueue_reference(queue, ptr, keys, labels, size):
  """One key at a time, in batch order. queue [D, C*K] and ptr [C] are updated in place."""
  for i in range(keys.shape[0]):
    c = int(labels[i])
    p = int(ptr[c])
    queue[:, c * size + p] = keys[i]
    ptr[c] = (p + 1) % size
  return queue, ptr


def info_nce_reference(q, k, queue, temperature=0.2):
  """MoCo: logits [B, 1+N] = [q.k, q.queue] / T, cross-entropy with label 0. queue [D, N]."""
  l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
  l_neg = q @ queue
  logits = torch.cat([l_pos, l_neg], dim=1) / temperature
  target = torch.zeros(q.shape[0], dtype=torch.long)
  return F.cross_entropy(logits, target)


def mixed_info_nce_reference(q_m, k_a, k_b, lam, queue, temperature=0.2):
  """Eq. (6), sample by sample. lam: float or [B] tensor. queue [D, N]."""
  lam = torch.as_tensor(lam, dtype=q_m.dtype).expand(q_m.shape[0])
  total = 0.0
  for i in range(q_m.shape[0]):
    neg = q_m[i] @ queue / temperature  # [N]
    for key, weight in ((k_a[i], lam[i]), (k_b[i], 1.0 - lam[i])):
      pos = (q_m[i] @ key / temperature).reshape(1)
      total = total - weight * torch.log_softmax(torch.cat([pos, neg]), 0)[0]
  return total / q_m.shape[0]


def co_tuning_reference(source_logits, targets):
  """Soft cross-entropy, batch mean."""
  return -(targets * torch.log_softmax(source_logits, dim=-1)).sum(-1).mean()
