"""Rollout batch structure: masks, selection (with images), concatenation, and log-probs consistent with sampling."""
from __future__ import annotations

import torch

from seqrl.algorithms.rollout import RolloutBatch, cat_rollouts, response_mask_from

EOS, PAD = 9, 0


def test_response_mask_keeps_tokens_through_first_eos():
    resp = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, PAD], [5, 6, 7, 8, 5]])
    mask, truncated = response_mask_from(resp, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


class _S:
    def __init__(self, n_images):
        self.images = [object()] * n_images
        self.prompt, self.answer, self.kind = "p", "1", "int"


def _batch(P, T, n_rows, images_per_row, patch_rows, start=0):
    ids = torch.arange(n_rows * (P + T)).view(n_rows, P + T) + start
    grid = torch.tensor([[1, 2, 2]] * sum(images_per_row))
    pix = torch.arange(4 * sum(images_per_row) * 3, dtype=torch.float).view(-1, 3) + start
    return RolloutBatch(
        samples=[_S(k) for k in images_per_row], input_ids=ids, attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(n_rows, T), prompt_len=P, group_ids=torch.arange(n_rows) // 2,
        texts=[str(i) for i in range(n_rows)], truncated=torch.zeros(n_rows, dtype=torch.bool),
        mm={"pixel_values": pix, "image_grid_thw": grid},
    )


def test_select_slices_the_rows_image_patches():
    b = _batch(P=2, T=3, n_rows=4, images_per_row=[1, 2, 0, 1], patch_rows=4)
    sub = b.select(torch.tensor([1, 3]))
    # row 1 owns images 1 and 2 (patch rows 4..11); row 3 owns image 3 (patch rows 12..15)
    assert torch.equal(sub.mm["pixel_values"], torch.cat([b.mm["pixel_values"][4:12], b.mm["pixel_values"][12:16]]))
    assert sub.mm["image_grid_thw"].shape[0] == 3
    assert sub.texts == ["1", "3"] and torch.equal(sub.input_ids, b.input_ids[[1, 3]])


def test_cat_rollouts_repads_left_and_right_and_offsets_groups():
    a = _batch(P=2, T=3, n_rows=2, images_per_row=[0, 0], patch_rows=0)
    a.mm = {}
    b = _batch(P=3, T=2, n_rows=2, images_per_row=[0, 0], patch_rows=0, start=100)
    b.mm = {}
    c = cat_rollouts([a, b], pad_id=PAD)
    assert c.prompt_len == 3 and c.response_mask.shape == (4, 3)
    assert c.input_ids[0].tolist() == [PAD] + a.input_ids[0].tolist()  # prompt padded on the left
    assert c.input_ids[2].tolist() == b.input_ids[0].tolist() + [PAD]  # response padded on the right
    assert c.attention_mask[0, 0] == 0 and c.response_mask[2].tolist() == [1, 1, 0]
    assert c.group_ids.tolist() == [0, 0, 1, 1]


def test_segment_rows_count_each_whole_response_once():
    b = _batch(P=2, T=3, n_rows=5, images_per_row=[0] * 5, patch_rows=0)
    b.mm = {}
    b.response_ids = torch.tensor([4, 2, 4, 7, 2])  # rows 0/2 and 1/4 are segments of the same responses
    b.prompt_ids = torch.tensor([0, 0, 0, 1, 0])
    assert b.one_row_per_response().tolist() == [1, 0, 3]  # first row of responses 2, 4, 7
    c = cat_rollouts([b, b.select(torch.tensor([3]))], pad_id=PAD)
    assert c.response_ids.tolist() == [4, 2, 4, 7, 2, 15] and c.prompt_ids.tolist() == [0, 0, 0, 1, 0, 3]
    assert c.row_prompts.unique().numel() == 3
