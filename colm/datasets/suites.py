"""The zero-shot evaluation suites of the paper (spec 6.7): which EVAL scopes, in which order.

The procedures `P/EVALUATE/HELDOUT`, `P/EVALUATE/BBH` and `P/EVALUATE/BBLITE` (colm/experiments/eval.gin,
train.gin) take their dataset lists from here, as does `P/RETRIEVE/HELDOUT`; in gin:
    P/EVALUATE/BBH/Evaluator.datasets = @P/EVALUATE/BBH/suite_scopes()
    P/EVALUATE/BBH/suite_scopes.suite = "BBH"
"""

import difflib

import gin

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
