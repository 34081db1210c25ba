"""Which dataset scopes, in which order: the expert settings and the evaluation suites (spec 6.7).

Settings. An expert's index in a concatenated checkpoint is its position in its setting, so the paper's lists
below keep the original order for the released checkpoints (166 experts, the "Full"/FLAN setting) to route
unchanged. Each expert name maps to the dataset scope stem that launchers take as `-dataset` (`D/<scope>/TRAIN`).
A dataset family with experts of its own declares its setting in its module with `register_setting` (the toy
world: colm/datasets/toy.py); colm.datasets.families imports every family before the first lookup.

Experts of your own: a list entry may be any name. Its scope is the table's for a listed name, else given
explicitly as "Name:SCOPE" (meaning `D/SCOPE/TRAIN` and `D/SCOPE/EVAL`), else derived from the name
(upper-cased, separators dropped: "my-echo" -> MYECHO). Where a scope is used to build datasets
(`setting_scopes`), a scope of your own must be defined by a loaded gin file (launchers: -extra_gin_files);
concatenation needs only the names (`expert_names`).

Suites. The zero-shot evaluation suites of the paper, `P/EVALUATE/HELDOUT`, `P/EVALUATE/BBH`, `P/EVALUATE/BBLITE`
and `P/RETRIEVE/HELDOUT` (colm/experiments/eval.gin, train.gin, retriever.gin), take their dataset lists from here:
    P/EVALUATE/BBH/Evaluator.datasets = @P/EVALUATE/BBH/suite_scopes()
    P/EVALUATE/BBH/suite_scopes.suite = "BBH"
"""

import difflib
import re
from collections import OrderedDict

import gin

from colm import registry
from colm.datasets import families

# ----- the paper's expert settings ------------------------------------------------------------------------------

# T0 held-in datasets, indices 0-35 (the "T0 setting").
P3_NAMES = (
    "P3Agnews", "P3Amazonpolarity", "P3Cosmosqa", "P3Samsum", "P3Quartz", "P3Ropes", "P3Wikibio", "P3Paws",
    "P3Wikiqa", "P3Socialiqa", "P3Qasc", "P3Quail", "P3Dream", "P3Wiqa", "P3Quarel", "P3Sciq", "P3Quoref",
    "P3Duorc", "P3Rottentomatoes", "P3Yelp", "P3Commongen", "P3Gigaword", "P3Xsum", "P3Mrpc", "P3Qqp",
    "P3Commonsenseqa", "P3Cose", "P3Wikihop", "P3Hotpotqa", "P3Appreviews", "P3Trec", "P3Multinews", "P3Imdb",
    "P3Adversarialqa", "P3Cnndailymail", "P3Dbpedia14",
)

# FLAN 2021 tasks, indices 36-71.
FLANV2_NAMES = (
    "Flanv2zsAi2arceasy", "Flanv2zsAi2arcchallenge", "Flanv2zsAlgebralinear1d", "Flanv2zsBoolq", "Flanv2zsCoqa",
    "Flanv2zsDefpronounresolution", "Flanv2zsDrop", "Flanv2zsFixpunct", "Flanv2zsGemDart", "Flanv2zsGeme2enlg",
    "Flanv2zsGemwebnlgen", "Flanv2zsGemwikilinguaen", "Flanv2zsGluesst2", "Flanv2zsGluecola", "Flanv2zsGluemnli",
    "Flanv2zsGlueqnli", "Flanv2zsGluestsb", "Flanv2zsGluewnli", "Flanv2zsLambada", "Flanv2zsNaturalquestionsopen",
    "Flanv2zsNewsroom", "Flanv2zsOpenbookqa", "Flanv2zsOpinionabstractidebate",
    "Flanv2zsOpinionabstractrottentomatoes", "Flanv2zsParacrawlenes", "Flanv2zsPiqa", "Flanv2zsQuac",
    "Flanv2zsSentiment140", "Flanv2zsSnli", "Flanv2zsSquad", "Flanv2zsSupergluemultirc", "Flanv2zsSupergluerecord",
    "Flanv2zsTriviaqa", "Flanv2zsTruecase", "Flanv2zsUnifiedqascienceinst", "Flanv2zsWordsegment",
)

# Natural Instructions v2 task categories, indices 72-146.
NIV2_NAMES = (
    "Niv2zsTranslation", "Niv2zsProgramexecution", "Niv2zsQuestiongeneration", "Niv2zsSentimentanalysis",
    "Niv2zsTextcategorization", "Niv2zsTextmatching", "Niv2zsToxiclanguagedetection",
    "Niv2zsCauseeffectclassification", "Niv2zsInformationextraction", "Niv2zsTextualentailment",
    "Niv2zsWrongcandidategeneration", "Niv2zsNamedentityrecognition", "Niv2zsCommonsenseclassification",
    "Niv2zsFillintheblank", "Niv2zsTextcompletion", "Niv2zsSentencecomposition", "Niv2zsTitlegeneration",
    "Niv2zsLanguageidentification", "Niv2zsQuestionunderstanding", "Niv2zsSentenceperturbation",
    "Niv2zsAnswerabilityclassification", "Niv2zsSummarization", "Niv2zsCoreferenceresolution",
    "Niv2zsTextqualityevaluation", "Niv2zsTexttocode", "Niv2zsParaphrasing", "Niv2zsDialoguegeneration",
    "Niv2zsQuestionrewriting", "Niv2zsWordsemantics", "Niv2zsPostagging", "Niv2zsLinguisticprobing",
    "Niv2zsStorycomposition", "Niv2zsSpeakeridentification", "Niv2zsWordanalogy", "Niv2zsDatatotext",
    "Niv2zsStereotypedetection", "Niv2zsNegotiationstrategydetection", "Niv2zsDialogueactrecognition",
    "Niv2zsGenderclassification", "Niv2zsCoherenceclassification", "Niv2zsExplanation",
    "Niv2zsEthicsclassification", "Niv2zsWordrelationclassification", "Niv2zsSentenceordering",
    "Niv2zsAnswerverification", "Niv2zsMathematics", "Niv2zsIntentidentification", "Niv2zsKeywordtagging",
    "Niv2zsCodetotext", "Niv2zsDialoguestatetracking", "Niv2zsTextsimplification", "Niv2zsStancedetection",
    "Niv2zsFactverification", "Niv2zsGrammarerrordetection", "Niv2zsSectionclassification",
    "Niv2zsNumberconversion", "Niv2zsStyletransfer", "Niv2zsSpeakerrelationclassification",
    "Niv2zsIronydetection", "Niv2zsQuestiondecomposition", "Niv2zsOverlapextraction",
    "Niv2zsGrammarerrorcorrection", "Niv2zsSpellingerrordetection", "Niv2zsEntitygeneration",
    "Niv2zsSentenceexpansion", "Niv2zsDiscourseconnectiveidentification", "Niv2zsDiscourserelationclassification",
    "Niv2zsPoemgeneration", "Niv2zsEntityrelationclassification", "Niv2zsPunctuationerrordetection",
    "Niv2zsSpamclassification", "Niv2zsPaperreview", "Niv2zsSentencecompression", "Niv2zsPrepositionprediction",
    "Niv2zsMisc",
)

# Added in the FLAN setting, indices 147-165: 7 P3 sets, 4 dialog sets, AESLC, 7 WMT pairs.
ADD1_NAMES = (
    "P3Wscfixed", "P3Copa", "P3Hswag", "P3Wic", "P3Racehigh", "P3Racemiddle", "P3Webquestions",
    "Flanv2zsQrecc", "Flanv2zsWikidialog", "Flanv2zsQreccii", "Flanv2zsWikidialogii", "Flanv2zsAeslc",
    "Flanv2zsWmt16translatecsen", "Flanv2zsWmt16translatedeen", "Flanv2zsWmt16translateruen",
    "Flanv2zsWmt16translatefien", "Flanv2zsWmt16translateroen", "Flanv2zsWmt16translatetren",
    "Flanv2zsWmt14translatefren",
)

_ZERO_SHOT_PREFIXES = ("Flanv2zs", "Niv2zs")


def derived_scope(name: str) -> str:
    """The scope of an expert named without one: "My_Echo-2" -> "MYECHO2", "P3Agnews" -> "P3AGNEWS"."""
    return re.sub(r"[^A-Za-z0-9]", "", name).upper()


def scope_of(name: str) -> str:
    """Dataset scope stem of one of the paper's experts: P3AGNEWS, FLANV2AI2ARCEASY/ZS, NIV2TRANSLATION/ZS.

    FLAN, NIV2 and dialog experts drop the "zs" from the name and take the zero-shot "/ZS" scope; the scope of
    a P3 expert (and of any other name) is the name upper-cased (derived_scope).
    """
    for prefix in _ZERO_SHOT_PREFIXES:
        if name.startswith(prefix):
            return (prefix[: -len("zs")] + name[len(prefix):]).upper() + "/ZS"
    return derived_scope(name)


def _setting(*name_lists) -> OrderedDict:
    return OrderedDict((name, scope_of(name)) for names in name_lists for name in names)


# Settings of one family each (the smallest setting holding an expert, see setting_containing), then unions.
_PAPER_FAMILY_SETTINGS = {
    "P3": _setting(P3_NAMES),
    "Flanv2": _setting(FLANV2_NAMES),
    "Niv2": _setting(NIV2_NAMES),
    "Add1": _setting(ADD1_NAMES),
}
_PAPER_SETTINGS = {
    **_PAPER_FAMILY_SETTINGS,
    "P3flanv2": _setting(P3_NAMES, FLANV2_NAMES),
    "All": _setting(P3_NAMES, FLANV2_NAMES, NIV2_NAMES),
    "Full": _setting(P3_NAMES, FLANV2_NAMES, NIV2_NAMES, ADD1_NAMES),
}
_REGISTERED = {}  # setting name -> OrderedDict {expert: scope}, filled by the families' register_setting calls


def register_setting(name: str, experts) -> None:
    """Declares a family's expert setting, called by the family's module at import (colm/datasets/toy.py).

    experts: the expert names in index order, or a mapping {name: scope stem} in index order; a bare name's
    scope is derived_scope(name). A setting name or an expert name may be registered once.
    """
    setting = OrderedDict(experts.items() if hasattr(experts, "items") else ((e, derived_scope(e)) for e in experts))
    if not setting:
        raise ValueError(f"register_setting({name!r}): the setting names no experts.")
    if name in _PAPER_SETTINGS or name in _REGISTERED:
        raise ValueError(f"register_setting({name!r}): a setting of that name exists already.")
    for expert in setting:
        parse_entry(expert)  # checks that the name can become a folder name
        if expert in _PAPER_SETTINGS["Full"] or any(expert in s for s in _REGISTERED.values()):
            raise ValueError(f"register_setting({name!r}): expert {expert!r} is in another setting already.")
    _REGISTERED[name] = setting


_families_imported = False


def _registered() -> dict:
    """The registered settings, after importing every dataset family once (their modules register them)."""
    global _families_imported
    if not _families_imported:
        families.import_all()
        _families_imported = True
    return _REGISTERED


def all_settings() -> dict:
    """{setting name: OrderedDict {expert: scope}}: the paper's settings, then the families' registered ones.
    The dicts are the shared tables: copy before changing one (get_setting does)."""
    return {**_PAPER_SETTINGS, **_registered()}


def _known() -> OrderedDict:
    """Every listed expert (the paper's Full setting, then the registered ones) -> its scope."""
    known = OrderedDict(_PAPER_SETTINGS["Full"])
    for setting in _registered().values():
        known.update(setting)
    return known


# A name becomes a folder name (exp_out/<expert_dir>/<name>_<suffix>); a scope a gin scope (D/<SCOPE>/TRAIN).
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SCOPE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")
_NAMING_HELP = (
    'Name an expert of your own "Name:SCOPE" (its datasets are D/SCOPE/TRAIN and D/SCOPE/EVAL) or just "Name" '
    "(scope = the name upper-cased without separators), and pass the gin file defining those scopes to the "
    "launcher with -extra_gin_files."
)


def parse_entry(entry) -> tuple:
    """("Name", "SCOPE" or None) of one list entry, "Name" or "Name:SCOPE".

    An explicit scope may also be written as the dataset scope itself ("D/SCOPE/TRAIN"); the "D/" prefix and
    the split are dropped.
    """
    if not isinstance(entry, str):
        raise ValueError(f"Expert list entry {entry!r} is not a string. {_NAMING_HELP}")
    name, sep, scope = entry.partition(":")
    name, scope = name.strip(), scope.strip()
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"Expert name {name!r} (in {entry!r}) must start with a letter or digit and hold only "
                         "letters, digits, '_', '-' and '.' (it becomes a folder name). " + _NAMING_HELP)
    if not sep:
        return name, None
    if scope.startswith("D/"):
        scope = scope[len("D/"):]
    for split in ("/TRAIN", "/EVAL"):
        if scope.endswith(split):
            scope = scope[: -len(split)]
    if not _SCOPE_PATTERN.fullmatch(scope):
        raise ValueError(f"Expert {entry!r}: {scope!r} is no scope name (e.g. MYECHO or MYTASK/ZS). " + _NAMING_HELP)
    return name, scope


def _entries(name_or_list) -> list:
    """[(name, explicit scope or None)] of a setting name or list; checks emptiness and repeated names."""
    if isinstance(name_or_list, str):
        settings = all_settings()
        if name_or_list in settings:
            return [(name, None) for name in settings[name_or_list]]
        close = difflib.get_close_matches(name_or_list, list(settings) + list(_known()), n=5)
        raise ValueError(
            f"Unknown expert setting {name_or_list!r}. Settings: {sorted(settings)}"
            + (f"; close matches: {close}" if close else "")
            + ". To pick experts by name pass a list, e.g. [\"P3Agnews\", \"P3Cosmosqa\"]; experts of your own "
            "are listed the same way, e.g. [\"MyEcho\", \"MySentiment:REVIEWS\"]."
        )
    entries = [parse_entry(entry) for entry in name_or_list]
    if not entries:
        raise ValueError("The expert list is empty: give a setting name (e.g. \"Full\") or a list of expert names.")
    names = [name for name, _ in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Expert name(s) {repeated} appear more than once in the list; each expert needs one index.")
    return entries


def expert_names(name_or_list) -> list:
    """The expert names of a setting or list, in index order, without resolving scopes (concatenation reads
    exp_out/<expert_dir>/<name>_<suffix>/best.pt and needs nothing else)."""
    return [name for name, _ in _entries(name_or_list)]


def _loaded(scope: str, scopes: set) -> bool:
    return f"D/{scope}/TRAIN" in scopes or f"D/{scope}/EVAL" in scopes


def get_setting(name_or_list, check_scopes=True) -> OrderedDict:
    """OrderedDict {expert name: scope} for a setting name ("Full", "P3", ...) or an explicit list of names.

    The expert index in a concatenated checkpoint is the position in the returned dict. Returns a copy.
    List entries are names of this module's table (scope from the table), "Name:SCOPE", or other names (scope
    derived from the name). With check_scopes, every scope not taken from the table must be defined
    (`D/<scope>/TRAIN` or `D/<scope>/EVAL`) by the gin files parsed so far; pass False where no dataset
    registry is loaded and only file names depend on the scope.
    """
    setting = OrderedDict()
    known = _known()
    loaded = None
    for name, explicit in _entries(name_or_list):
        if explicit is None and name in known:
            setting[name] = known[name]
            continue
        scope = explicit if explicit is not None else derived_scope(name)
        if check_scopes:
            if loaded is None:
                loaded = set(registry.known_scopes())
            if not _loaded(scope, loaded):
                raise ValueError(_unknown_expert_message(name, explicit, scope))
        setting[name] = scope
    return setting


def _unknown_expert_message(name: str, explicit, scope: str) -> str:
    if explicit is not None:
        return (f"Expert {name!r}: its scope {scope!r} has no D/{scope}/TRAIN or D/{scope}/EVAL in the gin files "
                "given (a 'D/<SCOPE>/TRAIN/build.cls = @LocalDataset' binding, for instance). " + _NAMING_HELP)
    close = difflib.get_close_matches(name, list(_known()), n=3)
    return (f"Unknown expert name {name!r}: it is in no setting of colm/datasets/settings.py or a dataset family"
            + (f" (close matches: {close})" if close else "")
            + f", and the scope derived from it, D/{scope}/TRAIN, is defined by none of the gin files given. "
            + _NAMING_HELP)


def is_listed(name: str) -> bool:
    """Whether an expert name is in a setting (the paper's or a family's), not an expert of your own."""
    return name in _known()


def setting_containing(name: str) -> str:
    """The smallest named setting that contains an expert (P3, Flanv2, Niv2, Add1 or a family's, e.g. Toy)."""
    candidates = {**_PAPER_FAMILY_SETTINGS, **_registered()}
    for setting, experts in candidates.items():
        if name in experts:
            return setting
    raise ValueError(f"Expert {name!r} is in none of the settings {', '.join(candidates)}.")


@gin.configurable
def setting_scopes(setting=gin.REQUIRED, split="EVAL"):
    """["D/<scope>/<split>", ...] for every dataset of a setting (or explicit name list), in expert order.

    In gin: `P/EVALUATE/Evaluator.datasets = @setting_scopes()` with `setting_scopes.setting = "P3"`.
    """
    if split not in ("TRAIN", "EVAL"):
        raise ValueError(f"setting_scopes.split={split!r}; choose 'TRAIN' or 'EVAL'.")
    return [f"D/{scope}/{split}" for scope in get_setting(setting).values()]


# ----- the evaluation suites ----------------------------------------------------------------------------------

# T0 held-out: rank classification over every "original" template, pooled per dataset.
HELDOUT = (
    "P3RTE", "P3HSWAG", "P3COPA", "P3WIC", "P3WINOGRANDE", "P3CB", "P3STORYCLOZE",
    "P3ANLI/R1", "P3ANLI/R2", "P3ANLI/R3", "P3WSCFIXED",
)

# BIG-bench Hard: 19 tasks on BIG-bench's train+validation data, 3 (boolean_expressions, multistep
# arithmetic, web_of_lies) on the BBH test set.
BBH = (
    "BBBOOLEANEXPRESSIONS", "BBCAUSALJUDGEMENT", "BBDATEUNDERSTANDING", "BBDISAMBIGUATIONQA", "BBFORMALFALLACIES",
    "BBGEOMETRICSHAPES", "BBHYPERBATON", "BBLOGICALDEDUCTION", "BBMOVIERECOMMENDATION", "BBMULTISTEPARITHMETICTWO",
    "BBNAVIGATE", "BBOBJECTCOUNTING", "BBPENGUINSINATABLE", "BBREASONINGABOUTCOLOREDOBJECTS", "BBRUINNAMES",
    "BBSALIENTTRANSLATIONERRORDETECTION", "BBSNARKS", "BBSPORTSUNDERSTANDING", "BBTEMPORALSEQUENCES",
    "BBTRACKINGSHUFFLEDOBJECTS", "BBWEBOFLIES", "BBWORDSORTING",
)

# BIG-bench Lite: the 17 of its 24 tasks that the original evaluated.
BBLITE = (
    "BBBBQLITEJSON", "BBCONCEPTUALCOMBINATIONS", "BBCONLANGTRANSLATION", "BBFORMALFALLACIES", "BBHINDUKNOWLEDGE",
    "BBKNOWNUNKNOWNS", "BBLINGUISTICSPUZZLES", "BBLOGICGRIDPUZZLE", "BBLOGICALDEDUCTION", "BBNOVELCONCEPTS",
    "BBOPERATORS", "BBPLAYDIALOGSAMEORDIFFERENT", "BBREPEATCOPYLOGIC", "BBSTRANGESTORIES", "BBSTRATEGYQA",
    "BBVITAMINCFACTVERIFICATION", "BBWINOWHY",
)

SUITES = {"HELDOUT": HELDOUT, "BBH": BBH, "BBLITE": BBLITE}


@gin.configurable
def suite_scopes(suite=gin.REQUIRED, split="EVAL"):
    """["D/<scope>/EVAL", ...] of an evaluation suite ("HELDOUT", "BBH" or "BBLITE"), in the paper's order."""
    if suite not in SUITES:
        close = difflib.get_close_matches(str(suite), list(SUITES), n=3)
        raise ValueError(
            f"Unknown evaluation suite {suite!r}; suites: {sorted(SUITES)}"
            + (f" (close matches: {close})" if close else "")
            + "."
        )
    return [f"D/{scope}/{split}" for scope in SUITES[suite]]
