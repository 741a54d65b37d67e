"""The model under test: the parts every probe reads (UNet, scheduler, text components), running it without disturbing
training, and reading weights files safely."""
