# An AMI with spot-supervisor baked in, on top of an AWS Deep Learning AMI (Ubuntu 22.04).
#
#   packer init systemd/packer && packer build -var region=us-east-1 systemd/packer
#
# Run from the repository root: the source tree is uploaded and installed with
# systemd/install.sh (there is no PyPI release). The unit is enabled, not started: the
# per-run config comes from user-data (systemd/cloud-init/user-data.yaml).
packer {
  required_plugins {
    amazon = {
      version = ">= 1.2.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "g5.xlarge"
}

variable "ami_name_prefix" {
  type    = string
  default = "spot-supervisor-dlami"
}

# The DLAMI family to start from; the newest image of it is used.
variable "base_ami_name" {
  type    = string
  default = "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "dlami" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "ubuntu"
  ami_name      = "${var.ami_name_prefix}-${local.timestamp}"

  source_ami_filter {
    filters = {
      name                = var.base_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  # The daemon speaks IMDSv2 only; so should instances from this AMI.
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name       = "${var.ami_name_prefix}-${local.timestamp}"
    BaseAMI    = "{{ .SourceAMI }}"
    BaseAMIName = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.dlami"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/spot-supervisor-src"]
  }

  # The source tree (install.sh installs from it with pip).
  provisioner "file" {
    source      = "./"
    destination = "/tmp/spot-supervisor-src"
  }

  provisioner "shell" {
    execute_command = "sudo -E sh -eux '{{ .Path }}'"
    inline = [
      # Wait for the first boot's cloud-init and apt to finish before installing.
      "cloud-init status --wait || true",
      "apt-get update",
      "DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv",
      # An explicit Python >= 3.10 (Ubuntu 22.04's is 3.10); install.sh checks it.
      "/tmp/spot-supervisor-src/systemd/install.sh --python /usr/bin/python3 --source /tmp/spot-supervisor-src",
    ]
  }

  # Validate before the snapshot: the CLI runs, the unit verifies on this systemd, it is
  # enabled, and it is not running (no config for a run exists yet).
  provisioner "shell" {
    execute_command = "sudo -E sh -eux '{{ .Path }}'"
    inline = [
      "/opt/spot-supervisor/venv/bin/spot-supervisor --version",
      "out=$(systemd-analyze verify /etc/systemd/system/spot-supervisor.service 2>&1); echo \"$out\"; test -z \"$out\"",
      "systemctl is-enabled spot-supervisor.service",
      "! systemctl is-active spot-supervisor.service",
    ]
  }

  # Clean the machine's identity last, so every instance of the AMI gets its own.
  provisioner "shell" {
    execute_command = "sudo -E sh -eux '{{ .Path }}'"
    inline = [
      "rm -rf /tmp/spot-supervisor-src",
      # The example config is a template; user-data writes the real one at launch.
      "cloud-init clean --logs --seed",
      "rm -f /etc/ssh/ssh_host_*",
      # Empty, not deleted: systemd then generates a new id on the first boot.
      "truncate -s 0 /etc/machine-id",
      "rm -f /var/lib/dbus/machine-id && ln -s /etc/machine-id /var/lib/dbus/machine-id",
      "journalctl --rotate && journalctl --vacuum-time=1s || true",
      "rm -f /root/.bash_history /home/ubuntu/.bash_history",
      "sync",
    ]
  }
}
