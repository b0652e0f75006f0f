import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from hqdit_utils.chapters.plotting import (describe_format_split, plot_abs_histogram, plot_format_grids,  # noqa: E402
                                  plot_heatmap)


def test_abs_histogram_of_a_tensor_sums_to_eight_per_octave():
    fig, ax = plt.subplots()
    plot_abs_histogram(torch.randn(10_000), ax=ax)
    (stairs,) = ax.patches
    assert abs(stairs.get_data().values.sum() - 8.0) < 1e-6  # 8 bins per octave, fractions sum to 1
    plt.close(fig)


def test_grid_and_heatmap_plots_draw_one_row_per_item():
    fig, ax = plt.subplots()
    plot_format_grids(["int4", "fp4_e2m1"], ax=ax)
    assert len(ax.get_yticks()) == 2
    plot_heatmap(pd.DataFrame([[1.0, 2.0], [3.0, 4.0]], index=["a", "b"]), ax=ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    plt.close(fig)


def test_describe_format_split_names_every_format_most_used_first():
    assert describe_format_split({"fp4_e2m1": 36}, "weight") == "every weight chose E2M1"
    assert (describe_format_split({"fp4_e3m0": 15, "fp4_e1m2": 1, "fp4_e2m1": 20}, "activation")
            == "the activations split 20 E2M1, 15 E3M0, 1 E1M2")
