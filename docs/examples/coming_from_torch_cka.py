# %% [markdown]
# # Coming from torch-cka or pytorch-cka
#
# The torch-cka README's example and the pytorch-cka README's plots, done with ckapipe. Run it as a
# notebook (each `# %%` is a cell; every figure is returned, so the cell shows it) or as a script:
#
#     python docs/examples/coming_from_torch_cka.py [FIGURES_DIR]
#
# which writes the figures into FIGURES_DIR when one is given, and nothing otherwise. Offline: the two
# networks stand in for torch-cka's pretrained ResNet-18 and ResNet-34 (no downloads here); they are
# ckapipe's digits CNNs, trained on scikit-learn's digits in seconds and kept in ./cache/models.

# %%
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ckapipe import compare
from ckapipe.analyze import plots
from ckapipe.extract.models import load_model
from ckapipe.extract.zoo import digits_tensors

model1 = load_model("zoo:cnn3?seed=0").module  # torch-cka: resnet18(pretrained=True)
model2 = load_model("zoo:cnn2?seed=0").module  # torch-cka: resnet34(pretrained=True)
inputs, _ = digits_tensors()
dataloader = DataLoader(inputs, batch_size=64, shuffle=False)  # its batches are the minibatches

# %% [markdown]
# ## torch-cka's README example
#
# torch-cka: `cka = CKA(model1, model2, model1_name="ResNet18", model2_name="ResNet34")`,
# `cka.compare(dataloader)`, `cka.plot_results(save_path=...)`, `results = cka.export()`.
# ckapipe: one call; every layer against every layer, exact (float64), with a bootstrap interval.

# %%
res = compare({"cnn3": model1, "cnn2": model2}, dataloader, layers="*", progress=False)
res.cka  # DataArray (layer_a, layer_b): the cnn3 layers against the cnn2 layers
heatmap = res.plot()  # torch-cka's plot_results; res.plot(save="resnet_compare.png") writes it
results = res.to_dataframe()  # torch-cka's export(): a row per layer pair (within each model too), cka_low, cka_high

# %% [markdown]
# ## pytorch-cka's README plots
#
# pytorch-cka: `plot_cka_heatmap(matrix, ..., annot=True, cmap="magma", mask_upper=True)` of a model
# against itself and against another, `plot_cka_trend(...)` of the similarity along the layers, and
# `plot_cka_comparison(...)` of several pairs side by side. ckapipe draws the same from the results.

# %%
self_similarity = res.plot("cnn3")  # one model against itself: its layer x layer self-similarity
cross = res.plot("cnn3", "cnn2", vmin="data", vmax="data", cmap="viridis", annotate=True)  # the data's range
trend = plots.layer_trend_figure(res, "cnn3", "cnn2")  # each cnn3 layer's best match in cnn2, interval band

model3 = load_model("zoo:cnn3?seed=1").module  # a third network: all pairs in one pass
three = compare({"cnn3": model1, "cnn3-seed1": model3, "cnn2": model2}, dataloader, layers="*", progress=False)
grid = plots.grid_figure(three, [("cnn3", "cnn3-seed1"), ("cnn3", "cnn2")])  # one colour scale, one colour bar

# %%
FIGURES = {"heatmap": heatmap, "self_similarity": self_similarity, "cross": cross, "trend": trend, "grid": grid}
if __name__ == "__main__" and len(sys.argv) > 1:
    for name, figure in FIGURES.items():
        figure.savefig(Path(sys.argv[1]) / f"{name}.png", dpi=120)
    print(results.head())
