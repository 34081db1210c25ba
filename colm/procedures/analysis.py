"""Analysis processors: given every evaluated batch, write something per dataset."""

import json
import os

import gin

from colm.utils.atomic import atomic_path
from colm.utils.paths import expand


class AnalysisProcessor:
    def __init__(self, save_dir):
        self.save_dir = save_dir

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        pass

    def dataset_process(self, dataset_name):
        pass

    def cross_dataset_process(self):
        pass

    def save(self, step=None):
        pass

    def path_for(self, dataset_name, suffix):
        directory = expand(self.save_dir, f"{type(self).__name__}.save_dir")
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, dataset_name.replace("/", "_") + suffix)


@gin.configurable
class WriteOutputText(AnalysisProcessor):
    """Per dataset, a JSON list of per-example records (generation: output text vs references;
    classification: answer choices, label, prediction)."""

    def __init__(self, save_dir=gin.REQUIRED):
        super().__init__(save_dir)
        self.records = []

    def batch_process(self, batch, outputs, global_hidden_dict, model):
        for i, input_str in enumerate(batch["input_str"]):
            record = {"input_str": input_str, "target_str": batch["target_str"][i]}
            if "output_text" in outputs:
                record.update(output_text=outputs["output_text"][i], references=batch["references"][i])
            if "prediction" in outputs:
                record.update(answer_choices=batch["answer_choices"][i], label=int(batch["label"][i]),
                              prediction=int(outputs["prediction"][i]),
                              multi_label=(batch.get("multi_label") or [None] * len(batch["input_str"]))[i])
            self.records.append(record)

    def dataset_process(self, dataset_name):
        with atomic_path(self.path_for(dataset_name, ".json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(self.records, f, indent=1)
        self.records = []
