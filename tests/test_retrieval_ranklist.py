"""The rank-list picture: rows of query + top-k, green borders for hits and red for misses."""

import numpy as np

from trainers.monitor import log_line, rank_list_image


def test_rank_list_borders():
    q = np.full((16, 8, 3), 128, dtype=np.uint8)
    g = [[np.full((16, 8, 3), 50, dtype=np.uint8) for _ in range(3)]]
    img = rank_list_image([q], g, [[True, False, True]])
    assert img.dtype == np.uint8 and img.shape[0] == 16 + 4
    x0 = 8 + 18  # first gallery cell after the query and the wide gap
    assert tuple(img[0, x0]) == (0, 200, 0)
    assert tuple(img[0, x0 + 8 + 6]) == (220, 0, 0)
    assert tuple(img[8, x0 + 4]) == (50, 50, 50)


def test_seed_log_line():
    line = log_line(3, 20, 186, 1.23456, 0.5, 3.5e-4, 812.34)
    assert line == "Epoch[3] Iteration[20/186] Loss: 1.235, Acc: 0.500, Base Lr: 3.50e-04, 812.3 images/s"
