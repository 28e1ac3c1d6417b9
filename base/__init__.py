"""Abstract classes: BaseModel, BaseDataSet, BaseDataLoader and BaseTrainer (with its TrainerSettings)."""
