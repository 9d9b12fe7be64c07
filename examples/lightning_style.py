"""A PyTorch Lightning 1.1 style script: a digits classifier with an auxiliary decoder, two
optimizers (optimizer_idx), a LightningDataModule, self.log(..., prog_bar=True),
validation_epoch_end and trainer.test.

Written as for pytorch_lightning 1.1: the import of ``pl`` below is the only line that differs.

    python examples/lightning_style.py --max_epochs 5
"""

from argparse import ArgumentParser

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchplug.lightning as pl


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images): 60% train, 20% validation, 20% test."""

    def __init__(self, batch_size=64):
        super().__init__()
        self.batch_size = batch_size

    def prepare_data(self):
        load_digits()  # bundled with scikit-learn: nothing to download

    def setup(self, stage=None):
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
        x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                        random_state=0)
        self.train_set = TensorDataset(x_train, y_train)
        self.val_set = TensorDataset(x_val, y_val)
        self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.batch_size)


class AutoencodingClassifier(pl.LightningModule):
    """An encoder and classifier trained on the labels (optimizer 0) and a decoder trained to
    rebuild the image from the encoder's features (optimizer 1)."""

    def __init__(self, hidden=64, lr=3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, 10)
        self.decoder = nn.Linear(hidden, 64)

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, y = batch
        if optimizer_idx == 0:
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
        else:
            loss = F.mse_loss(self.decoder(self.encoder(x).detach()), x)
            self.log("recon_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "correct": (logits.argmax(1) == y).sum(), "n": len(y)}

    def validation_epoch_end(self, outputs):
        correct = sum(out["correct"] for out in outputs)
        seen = sum(out["n"] for out in outputs)
        self.log("val_loss", torch.stack([out["loss"] for out in outputs]).mean(), prog_bar=True)
        self.log("val_acc", correct.float() / seen, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        classify = torch.optim.Adam(list(self.encoder.parameters()) + list(self.classifier.parameters()),
                                    lr=self.hparams.lr)
        rebuild = torch.optim.Adam(self.decoder.parameters(), lr=self.hparams.lr)
        return [classify, rebuild]


def main():
    parser = ArgumentParser()
    parser.add_argument("--max_epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    pl.seed_everything(1234)
    datamodule = DigitsDataModule(batch_size=args.batch_size)
    model = AutoencodingClassifier()
    trainer = pl.Trainer(max_epochs=args.max_epochs)
    trainer.fit(model, datamodule=datamodule)
    result = trainer.test(datamodule=datamodule)
    print(result)


if __name__ == "__main__":
    main()
