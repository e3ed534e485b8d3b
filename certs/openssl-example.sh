#!/bin/sh
# Build a jobworker PKI with plain openssl (3.x): what `jobworker-certs` does, for operators who
# run their own CA. Usage: certs/openssl-example.sh OUTDIR
# Environment: SERVER_HOST (an extra DNS name or IP for the server, optional),
# CLIENT_NAME (default alice), CLIENT_ROLE (admin, user or viewer; default admin).
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
SERVER_HOST=${SERVER_HOST:-}
CLIENT_NAME=${CLIENT_NAME:-alice}
CLIENT_ROLE=${CLIENT_ROLE:-admin}
case $CLIENT_ROLE in
    admin | user | viewer) ;;
    *) echo "$0: CLIENT_ROLE must be admin, user or viewer" >&2; exit 2 ;;
esac

# Keys are created readable by their owner only; certificates are made world-readable below.
umask 077
mkdir -p "$out"
cd "$out"

# 1. The CA: self-signed, CA:TRUE, may only sign certificates and CRLs.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -keyout ca.key -out ca.pem -days 3650 \
    -subj "/CN=jobworker CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"

# 2. The server: its SANs must include every name or address clients dial.
#    An IP address must be an IP: entry; a DNS: entry holding an IP never matches.
san="DNS:localhost,IP:127.0.0.1,IP:::1"
case $SERVER_HOST in
    "") ;;
    *:*) san="$san,IP:$SERVER_HOST" ;;        # IPv6 literal
    *[!0-9.]*) san="$san,DNS:$SERVER_HOST" ;;  # host name
    *) san="$san,IP:$SERVER_HOST" ;;          # IPv4 literal
esac
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout server.key -out server.csr -subj "/CN=jobworker server"
cat > server.ext <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -sha256 -days 825 \
    -extfile server.ext -out server.pem

# 3. A client: CN is the identity, OU the role; it needs the clientAuth extended key usage.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$CLIENT_NAME.key" -out "$CLIENT_NAME.csr" \
    -subj "/OU=$CLIENT_ROLE/CN=$CLIENT_NAME"
cat > client.ext <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
openssl x509 -req -in "$CLIENT_NAME.csr" -CA ca.pem -CAkey ca.key -sha256 -days 825 \
    -extfile client.ext -out "$CLIENT_NAME.pem"

rm -f server.csr server.ext "$CLIENT_NAME.csr" client.ext
chmod 644 ca.pem server.pem "$CLIENT_NAME.pem"

# 4. Check the chain and the purposes, as the daemon and clients will.
openssl verify -CAfile ca.pem -purpose sslserver server.pem
openssl verify -CAfile ca.pem -purpose sslclient "$CLIENT_NAME.pem"
