"""The expert settings: which experts, in which order (spec 6.7). One module that everything imports.

An expert's index in a concatenated checkpoint is its position in the setting, so these lists must keep
the original order for the released checkpoints (166 experts, the "Full"/FLAN setting) to route unchanged.
Each expert name maps to the dataset scope stem that launchers take as `-dataset` (`D/<scope>/TRAIN`).
"""

import difflib
from collections import OrderedDict

import gin

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

# The embedded toy world (colm/datasets/toy.gin).
TOY_NAMES = (
    "ToyReverse", "ToySort", "ToyFirstletter", "ToyLastletter", "ToyDouble", "ToyShift", "ToyDedup",
    "ToySwaphalves", "ToyFirstisvowel", "ToyLengthparity", "ToyContainsa", "ToyFirstletterclass",
)

_ZERO_SHOT_PREFIXES = ("Flanv2zs", "Niv2zs")


def scope_of(name: str) -> str:
    """Dataset scope stem of an expert: P3AGNEWS, FLANV2AI2ARCEASY/ZS, NIV2TRANSLATION/ZS, TOYREVERSE.

    For P3 and toy experts the scope is the upper-cased name (the scope column of spec 6.7 is exactly
    that); FLAN, NIV2 and dialog experts drop the "zs" from the name and take the zero-shot "/ZS" scope.
    """
    for prefix in _ZERO_SHOT_PREFIXES:
        if name.startswith(prefix):
            return (prefix[: -len("zs")] + name[len(prefix):]).upper() + "/ZS"
    if name.startswith(("P3", "Toy")):
        return name.upper()
    raise ValueError(f"Expert name {name!r} starts with none of P3, Flanv2zs, Niv2zs, Toy: no scope rule for it.")


def _setting(*name_lists) -> OrderedDict:
    return OrderedDict((name, scope_of(name)) for names in name_lists for name in names)


SETTINGS = {
    "P3": _setting(P3_NAMES),
    "Flanv2": _setting(FLANV2_NAMES),
    "Niv2": _setting(NIV2_NAMES),
    "Add1": _setting(ADD1_NAMES),
    "P3flanv2": _setting(P3_NAMES, FLANV2_NAMES),
    "All": _setting(P3_NAMES, FLANV2_NAMES, NIV2_NAMES),
    "Full": _setting(P3_NAMES, FLANV2_NAMES, NIV2_NAMES, ADD1_NAMES),
    "Toy": _setting(TOY_NAMES),
}

# Explicit name lists are looked up here.
_KNOWN = OrderedDict(list(SETTINGS["Full"].items()) + list(SETTINGS["Toy"].items()))


def get_setting(name_or_list) -> OrderedDict:
    """OrderedDict {expert name: scope} for a setting name ("Full", "P3", ...) or an explicit list of names.

    The expert index in a concatenated checkpoint is the position in the returned dict. Returns a copy.
    """
    if isinstance(name_or_list, str):
        if name_or_list in SETTINGS:
            return OrderedDict(SETTINGS[name_or_list])
        close = difflib.get_close_matches(name_or_list, list(SETTINGS) + list(_KNOWN), n=5)
        raise ValueError(
            f"Unknown expert setting {name_or_list!r}. Settings: {sorted(SETTINGS)}"
            + (f"; close matches: {close}" if close else "")
            + ". To pick experts by name pass a list, e.g. [\"P3Agnews\", \"P3Cosmosqa\"]."
        )
    names = list(name_or_list)
    if not names:
        raise ValueError("The expert list is empty: give a setting name (e.g. \"Full\") or a list of expert names.")
    unknown = [n for n in names if n not in _KNOWN]
    if unknown:
        hints = {n: difflib.get_close_matches(str(n), list(_KNOWN), n=3) for n in unknown}
        raise ValueError(
            f"Unknown expert name(s) {unknown}. Close matches: {hints}. "
            "Names are those of colm/checkpoints/expert_order.py (spec 6.7), e.g. \"P3Agnews\", \"Flanv2zsBoolq\"."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Expert name(s) {repeated} appear more than once in the list; each expert needs one index.")
    return OrderedDict((n, _KNOWN[n]) for n in names)


def setting_containing(name: str) -> str:
    """The smallest named setting that contains an expert (P3, Flanv2, Niv2, Add1 or Toy)."""
    for setting in ("P3", "Flanv2", "Niv2", "Add1", "Toy"):
        if name in SETTINGS[setting]:
            return setting
    raise ValueError(f"Expert {name!r} is in none of the settings P3, Flanv2, Niv2, Add1, Toy.")


@gin.configurable
def setting_scopes(setting=gin.REQUIRED, split="EVAL"):
    """["D/<scope>/<split>", ...] for every dataset of a setting (or explicit name list), in expert order.

    In gin: `P/EVALUATE/Evaluator.datasets = @setting_scopes()` with `setting_scopes.setting = "P3"`.
    """
    if split not in ("TRAIN", "EVAL"):
        raise ValueError(f"setting_scopes.split={split!r}; choose 'TRAIN' or 'EVAL'.")
    return [f"D/{scope}/{split}" for scope in get_setting(setting).values()]
