"""Loading a split of a Hugging Face hub dataset: the one place that knows where each dataset lives today.

The registries keep the original (2023) dataset names, because promptsource templates and users know
them. Many of those names were loading scripts, which `datasets` 4+ no longer runs, or were moved under
an organisation. `HUB_SOURCES` maps each such name to the repository (and revision) that serves the same
rows as parquet now. `load_hf_split` resolves, in order:

1. the local override: `$COLM_DATA_DIR/<name>[/<config>]` (see colm.datasets.local), for clusters
   without internet and for tests;
2. `HUB_SOURCES[name]`, else the name itself, through `datasets.load_dataset`.

The special split "train_validation" is train followed by validation (used by BIG-bench).
"""

from colm.datasets.local import DATA_DIR_ENV, load_local_split, resolve_local_source

# original name -> (repository serving it today, revision or None). The configs and the row schema are
# those of the original. Entries with "refs/convert/parquet" read the hub's automatic parquet export of
# a script-only repository. Written from the hub's pages and public code that loads these repositories
# (2024-2026); not re-checked against the live hub from here (no network). A wrong entry fails with the
# local-copy hint below, and the local override always works.
HUB_SOURCES = {
    "ag_news": ("fancyzhx/ag_news", None),
    "amazon_polarity": ("fancyzhx/amazon_polarity", None),
    "cosmos_qa": ("allenai/cosmos_qa", "refs/convert/parquet"),
    "samsum": ("knkarthick/samsum", None),  # Samsung/samsum no longer resolves; a parquet mirror
    "quartz": ("allenai/quartz", None),
    "ropes": ("allenai/ropes", None),
    "wiki_bio": ("michaelauli/wiki_bio", "refs/convert/parquet"),
    "paws": ("google-research-datasets/paws", None),
    "wiki_qa": ("microsoft/wiki_qa", None),
    "social_i_qa": ("allenai/social_i_qa", "refs/convert/parquet"),
    "qasc": ("allenai/qasc", None),
    "quail": ("textmachinelab/quail", None),
    "dream": ("dataset-org/dream", None),
    "wiqa": ("allenai/wiqa", None),
    "quarel": ("community-datasets/quarel", None),
    "sciq": ("allenai/sciq", None),
    "quoref": ("allenai/quoref", None),
    "duorc": ("ibm/duorc", None),
    "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", None),
    "yelp_review_full": ("Yelp/yelp_review_full", None),
    "common_gen": ("allenai/common_gen", None),
    "gigaword": ("Harvard/gigaword", "refs/convert/parquet"),
    "xsum": ("EdinburghNLP/xsum", None),
    "glue": ("nyu-mll/glue", None),
    "commonsense_qa": ("tau/commonsense_qa", None),
    "cos_e": ("Salesforce/cos_e", None),
    "wiki_hop": ("wiki_hop", "refs/convert/parquet"),
    "hotpot_qa": ("hotpotqa/hotpot_qa", None),
    "app_reviews": ("sealuzh/app_reviews", None),
    "trec": ("CogComp/trec", "refs/convert/parquet"),
    "multi_news": ("alexfabbri/multi_news", "refs/convert/parquet"),
    "imdb": ("stanfordnlp/imdb", None),
    "adversarial_qa": ("UCLNLP/adversarial_qa", None),
    "cnn_dailymail": ("abisee/cnn_dailymail", None),
    "dbpedia_14": ("fancyzhx/dbpedia_14", None),
    "super_glue": ("aps/super_glue", None),
    "hellaswag": ("Rowan/hellaswag", "refs/convert/parquet"),
    "race": ("ehovy/race", None),
    "web_questions": ("stanfordnlp/web_questions", None),
    "winogrande": ("allenai/winogrande", None),
    "anli": ("facebook/anli", None),
    "lukaemon/bbh": ("lukaemon/bbh", "refs/convert/parquet"),
    "UCL-DARK/ludwig": ("UCL-DARK/ludwig", "refs/convert/parquet"),
}

# Datasets no hub repository serves: they load only from the local override.
LOCAL_ONLY = {
    "story_cloze": "Story Cloze 2016 needs a manual download (https://cs.rochester.edu/nlp/rocstories/); "
    "convert it with datasets and save_to_disk into $COLM_DATA_DIR/story_cloze/2016.",
    "ct0_data": "the CT0 generation sets (CBK) have no hub copy; put each task's <split>.jsonl (fields src, tgt) "
    "into $COLM_DATA_DIR/ct0_data/<task>.",
}


def hub_source(name):
    """(repository, revision) that serves the original dataset `name` today."""
    return HUB_SOURCES.get(name, (name, None))


def _local_hint(parts):
    return (
        f"Put a local copy at ${DATA_DIR_ENV}/{'/'.join(parts)} (a save_to_disk directory, or "
        "<split>.jsonl / <split>.parquet files) and set that environment variable."
    )


def _load_one(parts, split):
    local = resolve_local_source(parts)
    if local is not None:
        return load_local_split(local, split)
    name = parts[0]
    if name in LOCAL_ONLY:
        raise FileNotFoundError(f"Dataset {'/'.join(parts)!r} is not on the hub: {LOCAL_ONLY[name]}")
    repo, revision = hub_source(name)
    import datasets as hf_datasets  # imported on use: it costs most of a second at start-up

    config = parts[1] if len(parts) > 1 else None
    try:
        return hf_datasets.load_dataset(repo, config, split=split, revision=revision)
    except Exception as error:  # the hub's errors do not say how to work offline
        where = repo + (f"@{revision}" if revision else "")
        raise RuntimeError(
            f"Could not load {'/'.join(parts)!r} split {split!r} from the hub ({where}, config {config!r}): "
            f"{type(error).__name__}: {error}. {_local_hint(parts)}"
        ) from error


def path_parts(dataset_path):
    """dataset_path as a list of names [name, config...], without the original's leading "huggingface"."""
    parts = [p for p in ([dataset_path] if isinstance(dataset_path, str) else (dataset_path or [])) if p]
    return parts[1:] if parts and parts[0] == "huggingface" else parts


def load_hf_split(dataset_path, split):
    """The `datasets.Dataset` of one split; dataset_path = (name,) or (name, config), as in the registries.

    A leading "huggingface" element (the original's dataset_path convention) is accepted and dropped.
    """
    parts = path_parts(dataset_path)
    if not parts:
        raise ValueError(f"dataset_path={dataset_path!r} names no dataset; expected (name,) or (name, config).")
    if split == "train_validation":
        import datasets as hf_datasets

        return hf_datasets.concatenate_datasets([_load_one(parts, "train"), _load_one(parts, "validation")])
    return _load_one(parts, split)

