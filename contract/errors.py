"""The errors that reading a file or an image raises: each carries a message meant for
whoever sent the file or the image. Which status each becomes is the service's business
(service/errors.py maps every error to its HTTP and gRPC status in one table)."""


class ContractError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ContractError):
    """Not an image, truncated, the wrong size, or a format we do not take."""


class UploadTooLarge(ContractError):
    """Too many bytes, or more pixels than we will decode (per image or per request)."""


class InvalidModel(ContractError):
    """An .onnx file that is not one of our exported models, or one that does not compute
    here what it promises; reported, never served."""


class DeviceUnavailable(ContractError):
    """The device or engine a setting insists on cannot be used: startup fails."""
