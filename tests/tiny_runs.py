"""A tiny evaluated PALR run on a synthetic data set written in ml-100k's file format (titles, genres, numeric
user ids such as "1"), for the service, page and report tests. Built once per test session (a few seconds)."""

from __future__ import annotations

from pathlib import Path

from palr.data.synthetic import GENRES, synthetic_raw

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


def write_fake_ml100k(root: Path, n_users: int = 120, n_items: int = 60, seed: int = 1) -> Path:
    """``root/ml-100k/{u.data,u.item}`` from the synthetic generator; item 1 is "Star Wars (1977)"."""
    raw = synthetic_raw(n_users, n_items, seed=seed)
    d = root / "ml-100k"
    d.mkdir(parents=True, exist_ok=True)
    lines = [f"{int(u[1:]) + 1}\t{i}\t4\t{int(t)}" for u, i, t in zip(raw.users, raw.items, raw.times)]
    (d / "u.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    rows = []
    for iid in sorted(raw.titles, key=int):
        title = "Star Wars (1977)" if iid == "1" else raw.titles[iid]
        genres = set(raw.attributes[iid]["genres"])
        flags = "|".join("1" if g in genres else "0" for g in ML100K_GENRES)
        rows.append(f"{iid}|{title}|01-Jan-1990||http://example.org|{flags}")
    assert set(GENRES) <= set(ML100K_GENRES)
    (d / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
    return root


def build_tiny_run(root: Path) -> dict[str, Path]:
    """SASRec (2 epochs, 16-d) + a one-layer mini ranker (1 epoch), evaluated on test (test_ranks.npz)."""
    from palr.core.settings import ExampleConfig, FinetuneConfig, MiniConfig
    from palr.evaluate.palr import evaluate_palr_run
    from palr.train.finetune import finetune
    from palr.train.retriever import train_run

    data_dir = write_fake_ml100k(root / "data")
    rrun = train_run("ml-100k", "sasrec", root / "retriever", params={"epochs": 2, "hidden": 16, "max_len": 50},
                     data_dir=data_dir, progress=False)
    cfg = FinetuneConfig(epochs=1.0, valid_users=40, batch_size=16, mini=MiniConfig(vocab=300, dim=32, layers=1),
                         pretrain_epochs=1, examples=ExampleConfig(positions_per_user=2, n_candidates=20))
    prun = finetune(rrun, root / "palr", cfg, data_dir=data_dir, progress=False)
    evaluate_palr_run(prun, data_dir=data_dir, progress=False)
    return {"data_dir": data_dir, "retriever": rrun, "palr": prun, "root": root}
