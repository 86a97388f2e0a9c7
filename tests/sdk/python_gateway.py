"""The official Genesys Cloud Python SDK (PureCloudPlatformClientV2), unchanged, pointed at the
proxy through its documented gateway setting. Prints one JSON object of what it saw; never a
secret or token.

usage: python_gateway.py HOST PORT LOGIN_PREFIX CLIENT_ID CLIENT_SECRET TOKEN_LIFETIME_SECONDS [CA_FILE]
With CA_FILE the gateway is reached over HTTPS, trusting that CA (the SDK's ssl_ca_cert).
"""
import json
import sys
import time

import PureCloudPlatformClientV2 as pc
from PureCloudPlatformClientV2.rest import ApiException

host, port, login_prefix, client_id, secret, lifetime = sys.argv[1:7]
ca_file = sys.argv[7] if len(sys.argv) > 7 else None
seen = {}
if ca_file:
    pc.Configuration().ssl_ca_cert = ca_file

client = pc.api_client.ApiClient()
client.gateway_configuration = pc.GatewayConfiguration(
    host=host, protocol="https" if ca_file else "http", port=int(port), path_params_login=login_prefix, path_params_api=""
)

try:
    client.get_client_credentials_token(client_id, secret + "-wrong")
    seen["wrong_secret_status"] = 200
except ApiException as e:
    seen["wrong_secret_status"] = e.status

client.get_client_credentials_token(client_id, secret)
seen["token_prefix"] = client.access_token[:5]

users = pc.UsersApi(client).get_users(page_size=2)
seen["users"] = len(users.entities or [])
org = pc.OrganizationApi(client).get_organizations_me()
seen["org_id_set"] = bool(org.id)

try:
    pc.RoutingApi(client).get_routing_queues()
    seen["routing_status"] = 200
except ApiException as e:
    seen["routing_status"] = e.status
    seen["routing_code"] = json.loads(e.body)["code"]

# The proxy token expires; the app logs in again, as with Genesys.
time.sleep(int(lifetime) + 1)
try:
    pc.UsersApi(client).get_users()
    seen["expired_status"] = 200
except ApiException as e:
    seen["expired_status"] = e.status
client.get_client_credentials_token(client_id, secret)
seen["relogin_users"] = len(pc.UsersApi(client).get_users(page_size=2).entities or [])
print(json.dumps(seen))
