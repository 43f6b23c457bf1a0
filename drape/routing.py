"""Task prototypes and prototype routing.

A task's prototypes are the mean of the L2-normalised pooled image features and the mean
of the L2-normalised instruction embeddings over its training samples. At inference the
score of task t is ``alpha * cos(e_img, p_img[t]) + (1 - alpha) * cos(e_txt, p_txt[t])``
and the best task's generator makes the prompts; no task label is used.

Which features the router compares: the image side uses the pooled features of the
ImageNet-pretrained vision trunk, the text side uses the pooled sentence embedding of
the text tower. Routing compares image with image and text with text, so the two towers
need not share an embedding space (in the embedded preset they do not, since
EfficientNet-Lite0 and MiniLM were never trained together). The text side is what
separates tasks that share an image source and differ only in their instructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Prototypes:
    tasks: list[str]
    image: torch.Tensor  # (num_tasks, image_dim), unit norm
    text: torch.Tensor  # (num_tasks, text_dim), unit norm

    @classmethod
    def empty(cls, image_dim: int, text_dim: int) -> Prototypes:
        return cls([], torch.zeros(0, image_dim), torch.zeros(0, text_dim))

    def add(self, task: str, image_features: torch.Tensor, text_features: torch.Tensor) -> Prototypes:
        """Return prototypes with ``task`` added (or replaced) from its training features."""
        image = F.normalize(F.normalize(image_features.float(), dim=-1).mean(0), dim=0)
        text = F.normalize(F.normalize(text_features.float(), dim=-1).mean(0), dim=0)
        tasks, images, texts = list(self.tasks), list(self.image), list(self.text)
        if task in tasks:
            index = tasks.index(task)
            images[index], texts[index] = image, text
        else:
            tasks.append(task)
            images.append(image)
            texts.append(text)
        return Prototypes(tasks, torch.stack(images), torch.stack(texts))

    def scores(self, image_features: torch.Tensor, text_features: torch.Tensor, alpha: float) -> torch.Tensor:
        """Routing scores (N, num_tasks)."""
        image = F.normalize(image_features.float(), dim=-1) @ self.image.T
        text = F.normalize(text_features.float(), dim=-1) @ self.text.T
        return alpha * image + (1 - alpha) * text

    def route(self, image_features: torch.Tensor, text_features: torch.Tensor, alpha: float) -> list[str]:
        """Route each sample to the trained task with the best score."""
        if not self.tasks:
            raise ValueError("no prototypes yet: routing needs at least one trained task")
        best = self.scores(image_features, text_features, alpha).argmax(dim=-1)
        return [self.tasks[i] for i in best.tolist()]

    def statistics(self, task: str, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
        """Mean cosine similarity of a task's samples to its own prototypes, and the routing margin.

        The margin is the mean gap (alpha = 0.5) between the own task's routing score and the
        best other task's; it is 0 while only one task has prototypes.
        """
        index = self.tasks.index(task)
        image = F.normalize(image_features.float(), dim=-1) @ self.image[index]
        text = F.normalize(text_features.float(), dim=-1) @ self.text[index]
        scores = self.scores(image_features, text_features, alpha=0.5)
        others = torch.cat([scores[:, :index], scores[:, index + 1 :]], dim=1)
        margin = (scores[:, index] - others.max(dim=1).values).mean() if others.shape[1] else torch.tensor(0.0)
        return {"image_cosine": round(float(image.mean()), 4), "text_cosine": round(float(text.mean()), 4), "margin": round(float(margin), 4)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"image": self.image.contiguous(), "text": self.text.contiguous()}
